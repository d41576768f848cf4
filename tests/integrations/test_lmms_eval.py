"""The lmms-eval plugin (ivtp/integrations/lmms_eval.py) on the tiny-random preset and the local task in
tiny_shapes/. Runs in a venv with the `lmms` extra (`make test-lmms`); skipped where lmms-eval is not installed."""

import pytest

pytest.importorskip("lmms_eval")

import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from importlib.metadata import entry_points  # noqa: E402

import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402

from ivtp import PruneConfig, apply_pruning  # noqa: E402
from ivtp.data.shapes import draw_scene  # noqa: E402
from ivtp.data.templates import vicuna_v1_prompt  # noqa: E402
from ivtp.inference import Sample, generate  # noqa: E402
from ivtp.integrations.lmms_eval import IVTPLlava, UnsupportedInput, _cut, manifest  # noqa: E402
from ivtp.models import load_model, preset_aligner  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TASK_DIR = os.path.join(HERE, "tiny_shapes")
TASK = "ivtp_tiny_shapes"
CONFIG = os.path.join(ROOT, "configs", "ivtp_64.yaml")
IVTP_64_COUNTS = [576, 427, 277, 128, 112, 96, 80, 64]  # visual tokens after each step of configs/ivtp_64.yaml
POST_PROMPT = "\nAnswer the question using a single word."  # tiny_shapes.yaml's post_prompt


def _docs():
    with open(os.path.join(TASK_DIR, "tiny_shapes.jsonl")) as f:
        return [json.loads(line) for line in f]


def _visual(doc):
    return [draw_scene(seed=doc["seed"], size=336)[0]]


def _request(kind, args, doc_id):
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def _pruned_reference():
    """The pruned model built directly with ivtp's API, to compare the plugin with."""
    model, processor = load_model("tiny-random")
    apply_pruning(model, PruneConfig.load(CONFIG), aligner=preset_aligner("tiny-random"),
                  tokenizer=processor.tokenizer)
    return model, processor


def _llm_input_length(processor, question, image, visual_tokens):
    """Prompt length as the processor writes it (576 placeholders), with the image run cut to `visual_tokens`."""
    ids = processor(images=[image], text=[vicuna_v1_prompt(question)], return_tensors="pt")["input_ids"]
    return ids.shape[1] - 576 + visual_tokens


@pytest.fixture(scope="module")
def docs():
    return _docs()


@pytest.fixture(scope="module")
def plugin(docs):
    lm = IVTPLlava(pretrained="tiny-random", random_weights=True, prune_config=CONFIG, device="cpu",
                   dtype="float32", batch_size="2")
    lm.task_dict = {TASK: {"test": docs}}  # what lmms-eval's evaluator hands the model
    return lm


def test_entry_point_names_the_plugin_class():
    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "ivtp_llava"]
    assert len(eps) == 1, "the lmms_eval.models entry point is missing: reinstall with pip install -e '.[lmms]'"
    assert eps[0].value == "ivtp.integrations.lmms_eval:manifest"
    assert eps[0].load() is manifest
    from lmms_eval.models import get_model, list_available_models

    assert "ivtp_llava" in list_available_models()
    assert get_model("ivtp_llava") is IVTPLlava


def test_generate_until_is_the_pruned_models_greedy_answer(plugin, docs):
    requests = [_request("generate_until", (d["question"], {"max_new_tokens": 6}, _visual, i, TASK, "test"), i)
                for i, d in enumerate(docs)]
    out = plugin.generate_until(requests)

    model, processor = _pruned_reference()
    samples = [Sample(d["question"], _visual(d)[0]) for d in docs]
    expected = generate(model, processor, samples, max_new_tokens=6, batch_size=2)
    assert [o.text for o in out] == [r.answer for r in expected]
    assert plugin.last_visual_tokens == [IVTP_64_COUNTS] * len(docs)
    # lmms-eval's input-token accounting sees the LLM input after stage 1: 128 visual tokens, not 576.
    assert [o.token_counts.input_tokens for o in out] == [
        _llm_input_length(processor, s.prompt, s.image, 128) for s in samples]


def test_generate_until_stops_at_the_first_stop_string(plugin, docs):
    def answer(gen_kwargs):
        request = _request("generate_until", (docs[0]["question"], gen_kwargs, _visual, 0, TASK, "test"), 0)
        return plugin.generate_until([request])[0].text

    free = answer({"max_new_tokens": 8})
    assert len(free) >= 4, f"need a longer answer to cut: {free!r}"
    stop = free[2:4]
    assert answer({"max_new_tokens": 8, "until": ["@@absent@@", stop]}) == free[: free.find(stop)].strip()
    assert answer({"max_new_tokens": 8, "until": stop}) == free[: free.find(stop)].strip()
    assert _cut("a b. c\nd", ["\n", "."]) == "a b"  # the earliest of several, whatever their order


def test_loglikelihood_matches_the_pruned_forward_with_labels(plugin, docs):
    doc = docs[0]
    (logprob, greedy), (text_only, _) = plugin.loglikelihood([
        _request("loglikelihood", (doc["question"], " circle", _visual, 0, TASK, "test"), 0),
        _request("loglikelihood", ("Say a colour.", "red", None, 0, TASK, "test"), 0),
    ])
    # Reference: the pruned model's own forward, which shrinks the labels with the <image> run; labels mark the
    # continuation, so the in-LLM stage is guided by the prompt only, as in the plugin.
    model, processor = _pruned_reference()
    prompt = vicuna_v1_prompt(doc["question"])
    n_cont = len(processor.tokenizer(prompt + " circle").input_ids) - len(processor.tokenizer(prompt).input_ids)
    inputs = processor(images=_visual(doc), text=[prompt + " circle"], return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -n_cont:] = inputs["input_ids"][0, -n_cont:]
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert logprob == pytest.approx(-out.loss.item() * n_cont, rel=1e-4)
    targets = inputs["input_ids"][0, -n_cont:]
    assert greedy == bool((out.logits[0, -n_cont - 1 : -1].argmax(-1) == targets).all())
    assert text_only < 0


def test_one_image_per_request(plugin, docs):
    two = [_request("generate_until", ("Q?", {}, lambda d: _visual(d) * 2, 0, TASK, "test"), 0)]
    with pytest.raises(UnsupportedInput, match="one image per request.*doc 0 gives 2"):
        plugin.generate_until(two)
    video = [_request("generate_until", ("Q?", {}, lambda d: ["clip.mp4"], 0, TASK, "test"), 0)]
    with pytest.raises(UnsupportedInput, match="images only.*a video"):
        plugin.generate_until(video)
    with pytest.raises(NotImplementedError, match="multi_round"):
        plugin.generate_until_multi_round([])


def test_unpruned_model_with_prune_config_none(docs):
    lm = IVTPLlava(pretrained="tiny-random", prune_config="none", device="cpu")
    lm.task_dict = {TASK: {"test": docs}}
    out = lm.generate_until([_request("generate_until", (docs[0]["question"], {"max_new_tokens": 2}, _visual, 0,
                                                          TASK, "test"), 0)])
    assert lm.state is None and lm.last_visual_tokens == [[576]]
    _, processor = load_model("tiny-random")
    assert out[0].token_counts.input_tokens == _llm_input_length(processor, docs[0]["question"],
                                                                   _visual(docs[0])[0], 576)


def test_lmms_eval_cli_runs_the_local_task_offline(tmp_path, docs):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "ivtp_llava",
           "--model_args", f"pretrained=tiny-random,random_weights=True,prune_config={CONFIG},device=cpu",
           "--tasks", TASK, "--include_path", TASK_DIR, "--limit", "4", "--batch_size", "2",
           "--output_path", str(out_dir), "--log_samples", "--verbosity", "WARNING"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    [results_path] = glob.glob(str(out_dir / "**" / "*_results.json"), recursive=True)
    with open(results_path) as f:
        results = json.load(f)
    score = results["results"][TASK]["exact_match,none"]
    assert 0.0 <= score <= 1.0
    assert results["efficiency"]["by_task"][TASK]["docs_with_token_counts"] == len(docs)

    [samples_path] = glob.glob(str(out_dir / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    with open(samples_path) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == list(range(len(docs)))

    # The answers and input lengths are those of the pruned model, answering the task's prompts.
    model, processor = _pruned_reference()
    samples = [Sample(d["question"] + POST_PROMPT, _visual(d)[0]) for d in docs]
    expected = generate(model, processor, samples, max_new_tokens=8, batch_size=2)
    cut = [r.answer.split("\n")[0].split(".")[0].strip() for r in expected]  # the task's until: "\n", "."
    assert [r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0]
            for r in rows] == cut
    assert [r["token_counts"][0]["input_tokens"] for r in rows] == [
        _llm_input_length(processor, s.prompt, s.image, 128) for s in samples]


def test_on_llava_next_the_plugin_answers_as_generate_and_scores_as_the_forward(docs):
    """tiny-random-next, pruned by the same config: AnyRes crops, image_sizes handed on, the input-token count of
    the image's crops after stage 1."""
    lm = IVTPLlava(pretrained="tiny-random-next", prune_config=CONFIG, device="cpu", dtype="float32")
    lm.task_dict = {TASK: {"test": docs}}
    image = draw_scene(seed=docs[0]["seed"], size=336)[0].resize((672, 448))  # the 2 x 2 grid: 5 crops
    visual = lambda doc: [image]  # noqa: E731
    (out,) = lm.generate_until([_request("generate_until", (docs[0]["question"], {"max_new_tokens": 4}, visual, 0,
                                                             TASK, "test"), 0)])
    model, processor = load_model("tiny-random-next")
    apply_pruning(model, PruneConfig.load(CONFIG), aligner=preset_aligner("tiny-random-next"),
                  tokenizer=processor.tokenizer)
    (expected,) = generate(model, processor, [Sample(docs[0]["question"], image)], max_new_tokens=4)
    assert out.text == expected.answer and lm.last_visual_tokens[0][-1] == 5 * 64
    ids = processor(images=[image], text=[vicuna_v1_prompt(docs[0]["question"])], return_tensors="pt")["input_ids"]
    placeholders = int((ids == model.config.image_token_id).sum())
    assert out.token_counts.input_tokens == ids.shape[1] - placeholders + 5 * 128  # stage 1 hands on 128 per crop
    ((logprob, _),) = lm.loglikelihood([_request("loglikelihood", (docs[0]["question"], " circle", visual, 0, TASK,
                                                                    "test"), 0)])
    prompt = vicuna_v1_prompt(docs[0]["question"])
    n_cont = len(processor.tokenizer(prompt + " circle").input_ids) - len(processor.tokenizer(prompt).input_ids)
    inputs = processor(images=[image], text=[prompt + " circle"], return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -n_cont:] = inputs["input_ids"][0, -n_cont:]
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    assert logprob == pytest.approx(-loss.item() * n_cont, rel=1e-4)
