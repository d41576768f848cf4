"""The pruned model on a CUDA device: the paths a CPU never takes (cuBLAS, SDPA's flash and memory-efficient
kernels, bf16 on tensor cores). CI has no GPU, so these skip there; run them on a GPU machine with
`pytest tests/gpu` (docs/benchmarks.md records when they last ran and where).

References as on the CPU: the stock model for keep-all, recomputation for the KV cache, single samples for a padded
batch, eager attention for SDPA. Tolerances are those of the arithmetic: float32 paths agree to rounding; bf16 ones
are compared by relative error, because their kernels round differently by design.
"""

import pytest
import torch

from conftest import assert_cache_matches_recompute, assert_static_cache_matches_dynamic, batch_of
from ivtp import apply_pruning
from ivtp.models import tiny_aligner, tiny_random

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda"
N = 64  # patches of the 112 px test model
QUESTIONS = ["What colour is the circle?", "Is there a large red square at the top left of the image?", "Hello"]
# The stage-2 geometry of tests/patch/test_llama.py: 64 patches -> 32 in the ViT -> 8 after LLM layer 6.
STAGE2 = {"vision": {"keep": 32}, "llm": {"layers": 6, "group_size": 3, "keep": 8, "tau": -1.0}}
KEEP_ALL = {"vision": {"keep": 1.0}, "llm": {"keep": 1.0, "layers": 6, "tau": -1.0}}


def model_on_gpu(config=None, dtype=torch.float32, attn="sdpa", seed=0):
    """A tiny LLaVA (112 px) on the GPU, pruned by `config` unless it is None."""
    model, processor = tiny_random(seed, image_size=112)
    model.set_attn_implementation(attn)
    if config is not None:
        apply_pruning(model, config, aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    return model.to(CUDA, dtype), processor


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_keep_all_equals_the_stock_model(images, dtype, tol):
    stock, processor = model_on_gpu(dtype=dtype)
    pruned, _ = model_on_gpu(KEEP_ALL, dtype=dtype)
    batch = batch_of(processor, images(2) + [None], QUESTIONS, device=CUDA, dtype=dtype)
    with torch.no_grad():
        ref, out = stock(**batch).logits, pruned(**batch).logits
    real = batch["attention_mask"].bool()
    assert pruned.ivtp_state.last_llm_trace.counts == [[N, N, N], [N, N, N], []]
    assert rel_err(out[real], ref[real]) < tol


def test_generation_with_cache_equals_recomputation_float32(images):
    model, processor = model_on_gpu(STAGE2)
    assert_cache_matches_recompute(model, batch_of(processor, images(2) + [None], QUESTIONS, device=CUDA),
                                   new_tokens=10)


def test_bf16_cached_decoding_matches_a_forward_over_the_generated_text(images):
    """In bf16 a cached and an uncached greedy run may part at a near-tie, so the reference is one uncached
    forward over the sequence the cached run produced: its last positions must give the same logits."""
    model, processor = model_on_gpu(STAGE2, dtype=torch.bfloat16)
    batch = batch_of(processor, images(1), QUESTIONS[1:2], device=CUDA, dtype=torch.bfloat16)
    n = 8
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        ids = torch.cat([batch["input_ids"], out.sequences[:, -n:]], 1)  # the prompt as given, then the new tokens
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                     pixel_values=batch["pixel_values"]).logits  # (1, L - pruned + n, V)
    steps = torch.stack(out.logits, 1)  # (1, n, V): the prediction of each new token
    assert rel_err(steps, full[:, -(n + 1):-1]) < 2e-2


def test_static_cache_generation_equals_the_dynamic_cache_float32(images):
    """On CUDA, where generate would also compile a static-cache decoder: the pruned model stays eager by default
    and decodes as on the dynamic cache."""
    model, processor = model_on_gpu(STAGE2)
    assert_static_cache_matches_dynamic(model, batch_of(processor, images(2) + [None], QUESTIONS, device=CUDA),
                                        new_tokens=8)


def test_compiled_static_decoding_equals_eager_float32(images):
    """disable_compile=False: generate's own compile of the decode step (inductor, CUDA graphs) gives the eager
    tokens and logits of the dynamic cache."""
    model, processor = model_on_gpu(STAGE2)
    batch = batch_of(processor, images(2), QUESTIONS[:2], device=CUDA)
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    try:
        with torch.no_grad():
            ref = model.generate(**batch, **kwargs)
            out = model.generate(**batch, cache_implementation="static", disable_compile=False, **kwargs)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_equals_single_samples_float32(images):
    model, processor = model_on_gpu(STAGE2)
    imgs = images(2) + [None]
    with torch.no_grad():
        together = model.generate(**batch_of(processor, imgs, QUESTIONS, device=CUDA), max_new_tokens=8,
                                  do_sample=False)
        for i in range(3):
            alone = model.generate(**batch_of(processor, [imgs[i]], [QUESTIONS[i]], device=CUDA), max_new_tokens=8,
                                   do_sample=False)
            assert torch.equal(together[i, -8:], alone[0, -8:]), f"sample {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_kernels_agree_with_eager_attention(images, dtype, monkeypatch):
    """An unpadded pruned prefill passes SDPA no mask, so on a GPU it runs the flash (bf16) or memory-efficient
    kernel; it must pick the same tokens as eager attention and give the same logits to the dtype's rounding.
    The ViT's rollout layers take their output from the maps they compute (IVTP_FUSED_MAPS=0), the same under
    both implementations, so that the comparison isolates the LLM's kernels; test_fused_maps_* check the rest."""
    monkeypatch.setenv("IVTP_FUSED_MAPS", "0")
    runs = {}
    for attn in ("sdpa", "eager"):
        model, processor = model_on_gpu(STAGE2, dtype=dtype, attn=attn)
        with torch.no_grad():
            logits = model(**batch_of(processor, images(1), QUESTIONS[1:2], device=CUDA, dtype=dtype)).logits
        runs[attn] = logits, model.ivtp_state.last_llm_trace.kept_positions[0].cpu()
    (sdpa, kept_sdpa), (eager, kept_eager) = runs["sdpa"], runs["eager"]
    if dtype == torch.float32:
        assert torch.equal(kept_sdpa, kept_eager)
        assert rel_err(sdpa, eager) < 1e-5
    else:  # bf16 scores can swap near-ties: most kept tokens agree, and the logits to bf16 rounding
        overlap = len(set(kept_sdpa.flatten().tolist()) & set(kept_eager.flatten().tolist()))
        assert overlap >= 0.75 * kept_eager.numel()
        assert rel_err(sdpa, eager) < 3e-2


def test_training_step_in_bf16_gives_finite_gradients(images):
    model, processor = model_on_gpu(STAGE2, dtype=torch.bfloat16)
    model.train()
    batch = batch_of(processor, images(2), QUESTIONS[:2], device=CUDA, dtype=torch.bfloat16)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    loss = model(**batch, labels=labels.masked_fill(batch["attention_mask"] == 0, -100)).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.multi_modal_projector.parameters())


def test_bench_on_the_gpu_prices_the_memory_a_prefill_adds():
    from ivtp.eval.bench import bench

    out = bench("tiny-random", "ivtp", 64, device=CUDA, repeats=1, new_tokens=2, progress=False)
    base, ours = out["unpruned"]["prefill_peak_memory_bytes"], out["pruned"]["prefill_peak_memory_bytes"]
    assert 0 < base and 0 < ours  # above the resident weights, which both models hold throughout
    assert out["prefill_memory_ratio"] == ours / base
    assert out["pruned"]["kv_cache_bytes"] < out["unpruned"]["kv_cache_bytes"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, dim, causal", [(16, 64, False), (32, 128, True)])  # CLIP-L/14; Llama-7B's probe
def test_fused_maps_equal_the_torch_ops(dtype, heads, dim, causal):
    from ivtp.ops import fused_maps
    from ivtp.ops.rollout import head_mean_attention

    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k = (torch.randn(3, heads, 577, dim, device=CUDA, generator=g).to(dtype) for _ in range(2))
    ok = torch.rand(3, 577, device=CUDA, generator=g) > 0.1
    allowed = ok[:, None, :].expand(3, 577, 577)
    if causal:
        allowed = (allowed & torch.ones(577, 577, dtype=torch.bool, device=CUDA).tril()) | torch.eye(
            577, dtype=torch.bool, device=CUDA)
    ref = head_mean_attention(q, k, dim ** -0.5, torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None])
    got = fused_maps.head_mean_softmax(q, k, dim ** -0.5, ok, causal=causal)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_fused_maps_keep_the_same_tokens(images, monkeypatch):
    model, processor = model_on_gpu(STAGE2)
    batch = batch_of(processor, images(2), QUESTIONS[:2], device=CUDA)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("IVTP_FUSED_MAPS", flag)
        with torch.no_grad():
            logits = model(**batch).logits
        runs[flag] = logits, model.ivtp_state.last_trace.kept, model.ivtp_state.last_llm_trace.kept_positions
    assert torch.equal(runs["1"][1], runs["0"][1])
    assert all(torch.equal(a, b) for a, b in zip(runs["1"][2], runs["0"][2]))
    torch.testing.assert_close(runs["1"][0], runs["0"][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_prefill_equals_eager_on_cuda(images, mode):
    """The compiled prefill with inductor's CUDA kernels (and, with reduce-overhead, replayed as CUDA graphs):
    the same kept tokens and greedy tokens as eager, logits to float32 rounding, on a second call too (a replay)."""
    eager, processor = model_on_gpu(STAGE2)
    compiled, _ = tiny_random(0, image_size=112)
    apply_pruning(compiled, STAGE2, aligner=tiny_aligner(), tokenizer=processor.tokenizer,
                  compile={"mode": mode, "bucket": 16})
    compiled.to(CUDA)
    batch = batch_of(processor, images(2), QUESTIONS[:2], device=CUDA)
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = eager.generate(**batch, **kwargs)
        ref_kept = [p.cpu() for p in eager.ivtp_state.last_llm_trace.kept_positions]
        for _ in range(2):
            out = compiled.generate(**batch, **kwargs)
            assert torch.equal(out.sequences, ref.sequences)
            for a, b in zip(out.logits, ref.logits):
                assert rel_err(a, b) < 1e-4
            # the trace is in the padded prompt's positions: compare each row's kept tokens by their order
            kept = compiled.ivtp_state.last_llm_trace
            assert [k.numel() for k in kept.kept_positions] == [k.numel() for k in ref_kept]
