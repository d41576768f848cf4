"""ivtp/compiled.py: the pruned prefill as one full graph. Traced with dynamo's eager backend here (the tracing, not
a kernel compiler: inductor takes minutes per graph on this CPU); `fullgraph=True`, so a graph break fails."""

import pytest
import torch

from conftest import batch_of
from ivtp import ConfigError, apply_pruning
from ivtp.compiled import CompileOptions, bucket_length, pad_left
from ivtp.models import tiny_aligner

CONFIGS = {
    "ivtp": {"vision": {"keep": 32}, "llm": {"layers": 6, "group_size": 3, "keep": 8}},
    "topk": {"method": "topk", "topk": {"keep": 16}},
    "vispruner": {"method": "vispruner", "vispruner": {"visual_token_num": 16}},
    "fastv": {"method": "fastv", "fastv": {"keep": 16}},
    "ivtp-question": {"vision": {"keep": 32}, "llm": {"layers": 6, "group_size": 3, "keep": 8,
                                                     "instruction": "question", "relevance": "standardised",
                                                     "tau": 0.5}},
}
QUESTIONS = ["What colour is the circle?", "Is there a red square at the top left of the image?"]


class CountingBackend:
    """A torch.compile backend that counts the graphs it is handed and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def pruned(small_llava, name, compile=None):
    model, processor = small_llava()
    apply_pruning(model, CONFIGS[name], aligner=tiny_aligner(), tokenizer=processor.tokenizer, compile=compile)
    return model, processor


def shrunk_mask(model, batch):
    """The attention mask of the prompt as the model runs it (each image's run shrunk to the tokens it keeps)."""
    n = 0 if "pixel_values" not in batch else batch["pixel_values"].shape[0]
    return model.ivtp_state.shrink(batch["input_ids"], n, batch["attention_mask"], None, "left").attention_mask.bool()


def run(model, batch, new_tokens=4):
    with torch.no_grad():
        logits = model(**batch, use_cache=True).logits
        forward = (logits, model.ivtp_state.last_trace.kept, model.ivtp_state.last_llm_trace,
                   [g.to_json() for g in model.ivtp_state.last_guidance])
        gen = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return forward, gen


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_prefill_equals_eager(small_llava, images, name):
    """One full graph (a break would raise), and the same result as eager: the logits to rounding, the tokens each
    stage keeps, the guidance, and the tokens generate returns (its prompt padded to the bucket inside, cut from
    what it returns), with every step's logits."""
    backend = CountingBackend()
    eager, processor = pruned(small_llava, name)
    compiled, _ = pruned(small_llava, name, compile={"backend": backend, "bucket": 16})
    batch = batch_of(processor, images(2), QUESTIONS)
    (ref_logits, ref_kept, ref_llm, ref_guidance), ref_gen = run(eager, batch)
    (logits, kept, llm, guidance), gen = run(compiled, batch)
    assert backend.graphs == 2  # the forward's length, and generate's bucket
    real = shrunk_mask(eager, batch)
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(kept, ref_kept)
    if ref_llm is not None:
        assert llm.counts == ref_llm.counts
        assert all(torch.equal(a, b) for a, b in zip(llm.kept_positions, ref_llm.kept_positions))
    assert guidance == ref_guidance
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_graph_break_is_an_error(small_llava, images, monkeypatch):
    """fullgraph=True: a host read inside the prefill fails the compile instead of splitting the graph."""
    from ivtp.patch import llama

    model, processor = pruned(small_llava, "ivtp", compile={"backend": "eager"})
    monkeypatch.setattr(llama, "_has_images", lambda guidance: bool(guidance.visual.any()))  # a read-back
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="data-dependent"), torch.no_grad():
        model(**batch_of(processor, images(1), QUESTIONS[:1]))


def test_recompiles_stay_within_the_buckets(small_llava, images):
    """generate pads each prompt to a multiple of the bucket: one graph per bucket, not per prompt length."""
    backend = CountingBackend()
    model, processor = pruned(small_llava, "ivtp", compile={"backend": backend, "bucket": 8})
    words = "What colour is the small circle at the top left of the picture please".split()
    lengths = []
    for n in (1, 2, 4, 6, 9, 13):
        batch = batch_of(processor, images(1), [" ".join(words[:n])])
        lengths.append(batch["input_ids"].shape[1] - 64 + 32)  # as the model runs it: 64 patches, 32 kept
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=1, do_sample=False)
    buckets = {bucket_length(n, 8) for n in lengths}
    assert len(set(lengths)) == 6 and backend.graphs == len(buckets) < 6


def test_mixed_rows_and_padding_equal_eager(small_llava, images):
    """A batch with a text-only row and left padding: the rows' widths differ, known on the host (PrefillShape)."""
    eager, processor = pruned(small_llava, "ivtp")
    compiled, _ = pruned(small_llava, "ivtp", compile={"backend": "eager"})
    batch = batch_of(processor, images(1) + [None], QUESTIONS)
    (ref_logits, _, ref_llm, _), ref_gen = run(eager, batch)
    (logits, _, llm, _), gen = run(compiled, batch)
    real = shrunk_mask(eager, batch)
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    assert llm.counts == ref_llm.counts == [[32, 20, 8], []]
    assert torch.equal(gen.sequences, ref_gen.sequences)


@pytest.mark.parametrize("method", ["sparsevlm", "visiondrop"])
def test_data_dependent_methods_are_refused(small_llava, method):
    model, processor = small_llava()
    with pytest.raises(ConfigError, match="data-dependent number of tokens"):
        apply_pruning(model, {"method": method}, compile=True)
    assert not hasattr(model, "ivtp_state")  # refused before anything changed


@pytest.mark.parametrize("value, match", [
    ({"buckets": 8}, r"unknown option\(s\) \['buckets'\]"),
    ({"bucket": 0}, "compile.bucket: a positive number"),
    ("yes", "expected true, false or a dict"),
])
def test_bad_compile_options(value, match):
    with pytest.raises(ConfigError, match=match):
        CompileOptions.resolve(value)


def test_options_and_padding_helpers():
    assert CompileOptions.resolve(None) is None and CompileOptions.resolve(False) is None
    assert CompileOptions.resolve(True) == CompileOptions() and CompileOptions().backend == "inductor"
    assert [bucket_length(n, 32) for n in (1, 32, 33)] == [32, 32, 64]
    ids, mask = pad_left(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 1]]), 4, pad_id=0)
    assert ids.tolist() == [[0, 0, 5, 6], [0, 0, 7, 8]] and mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


def test_a_static_cache_after_the_compiled_prefill_equals_eager(small_llava, images):
    """generate with a static cache (what HF compiles its decode step on): the compiled prefill fills it as the eager
    one does."""
    eager, processor = pruned(small_llava, "ivtp")
    compiled, _ = pruned(small_llava, "ivtp", compile={"backend": "eager", "bucket": 16})
    batch = batch_of(processor, images(2), QUESTIONS)
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(compiled.generate(**batch, **kwargs), eager.generate(**batch, **kwargs))
