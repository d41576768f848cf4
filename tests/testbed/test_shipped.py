"""The testbed model shipped in ivtp/assets/testbed (`make testbed` writes it): it loads as `--model testbed`
with its own prune config and aligner, answers colour and shape questions well above chance at 7 of 64 visual tokens,
and keeps patches on the object asked about more often than their share of the image."""

import os
import random

import pytest
import torch

from ivtp.data.shapes import ask_colour, ask_shape, render, scene_for, target_patches
from ivtp.inference import Sample, generate
from ivtp.models import TESTBED_MODEL, load_for_inference, resolve_prune_config

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(TESTBED_MODEL, "config.json")),
                                reason="no shipped testbed model (make testbed)")


# Measured when shipped (2026-12-05, the tb32 model retrained as llm_only:question): colour 0.37 of 51 (chance 1/6),
# shape 0.88 of 59 (chance 1/3); 16% and 44% of the kept patches lie on the object asked about (its area: 6.4% and
# 6.6% of the image). Colour questions are where guidance still fails (docs/testbed.md, "Does the instruction guide?").
# Position is not tested here: at 7 tokens the model is near chance on it (docs/testbed.md).
@pytest.mark.parametrize("ask, floor", [(ask_colour, 2 / 6), (ask_shape, 1 / 2)], ids=["colour", "shape"])
def test_shipped_model_answers_and_keeps_the_object(ask, floor):
    """floor: twice chance for colour, 1.5 times for shape (three shapes leave less room above chance)."""
    from ivtp.testbed.configs import BEST_EXTENSION, extension_config

    config = resolve_prune_config(None, None, "testbed")  # the ivtp_config.json saved with the weights
    # make testbed ships the model retrained in our best extension, with its config (the aligner beside it)
    expected = extension_config(BEST_EXTENSION, 7, 6).to_dict()
    assert {**config.to_dict(), "llm": {**config.to_dict()["llm"], "aligner": None}} == {
        **expected, "llm": {**expected["llm"], "aligner": None}}
    torch.manual_seed(0)
    model, processor = load_for_inference("testbed", config)
    assert model.ivtp_state.aligner is not None  # the checkpoint's own aligner, not the config's path
    scenes, questions = [], []
    for i in range(60):  # scenes no training or eval split contains
        scene = scene_for(123, "kept", i, 112)
        q = ask(scene, random.Random(i))
        if q is not None:
            scenes.append(scene)
            questions.append(q)
    samples = [Sample(q["question"] + "\nAnswer the question using a single word or phrase.", render(s))
               for s, q in zip(scenes, questions)]
    results = generate(model, processor, samples, max_new_tokens=3, batch_size=32)
    assert all(r.visual_tokens[0] == 64 and r.visual_tokens[-1] == 7 for r in results)
    accuracy = sum(r.answer.strip().lower() == q["answer"] for r, q in zip(results, questions)) / len(results)
    on_target = [len(set(target_patches(s, q)) & set(r.kept_patches)) / len(r.kept_patches)
                 for s, q, r in zip(scenes, questions, results)]
    area = [len(target_patches(s, q)) / 64 for s, q in zip(scenes, questions)]
    assert accuracy > floor
    assert sum(on_target) / len(on_target) > 2 * sum(area) / len(area)


def _questions(ask, n, seed=123):
    scenes, questions = [], []
    for i in range(n):
        scene = scene_for(seed, "kept", i, 112)
        q = ask(scene, random.Random(i))
        if q is not None:
            scenes.append(scene)
            questions.append(q)
    return scenes, questions


def _run(config, scenes, questions):
    torch.manual_seed(0)
    model, processor = load_for_inference("testbed", config)
    samples = [Sample(q["question"] + "\nAnswer the question using a single word or phrase.", render(s))
               for s, q in zip(scenes, questions)]
    return generate(model, processor, samples, max_new_tokens=3, batch_size=32)


# Measured when shipped (2026-12-03, the aligner tuned on web-like captions; GQA-layout split, 700 questions): the
# question-only standardised pseudo-CLS holds a colour or shape word of the question in 98% of questions (25% with
# the contrastive aligner); after layer 0, it keeps 37% of shape questions' tokens on the object, the random
# control 20% (docs/testbed.md, "Does the instruction guide?").
def test_shipped_aligner_picks_the_key_word_and_the_pseudo_cls_finds_the_object():
    from ivtp.testbed.ablate import EXTENSIONS, _words, key_words
    from ivtp.testbed.configs import fit_prune_config

    scenes, questions = _questions(ask_shape, 40)
    shares = {}
    for name, row in (("guided", "early:question"), ("random", "early:random")):
        vision, llm = EXTENSIONS[row]
        config = fit_prune_config("ivtp", 7, 6, vision=vision, llm=llm)
        results = _run(config, scenes, questions)
        shares[name] = sum(len(set(target_patches(s, q)) & set(r.kept_patches)) / len(r.kept_patches)
                           for s, q, r in zip(scenes, questions, results)) / len(results)
        if name == "guided":
            hits = [bool(key_words(q["question"]) & {w for t in r.guidance["selected_tokens"] for w in _words(t["token"])})
                    for q, r in zip(questions, results)]
            assert sum(hits) / len(hits) >= 0.8
    assert shares["guided"] > shares["random"] + 0.05


def test_a_testbed_folder_from_the_shipped_model(tmp_path):
    """scripts/testbed_from_shipped.py: the folder the aligner stage and `ivtp ablate --finetuned` read."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script, out = os.path.join(root, "scripts", "testbed_from_shipped.py"), tmp_path / "tb"
    (tmp_path / "data").mkdir()
    subprocess.run([sys.executable, script, str(out), "--data", str(tmp_path / "data")], check=True, cwd=root,
                   capture_output=True)
    model, _ = load_for_inference("testbed", None)
    tower = CLIPVisionModel.from_pretrained(out / "clip" / "vision")
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=pixels).pooler_output,
                                   model.model.vision_tower.float()(pixel_values=pixels).pooler_output)
    assert os.path.realpath(out / "data") == str(tmp_path / "data")
    subprocess.run([sys.executable, script, str(out), "--attach"], check=True, cwd=root, capture_output=True)
    for name in ("aligner.safetensors", "config.json", "model.safetensors"):
        assert (out / "llava" / name).is_file()
    assert load_file(out / "llava" / "aligner.safetensors").keys() == load_file(
        os.path.join(TESTBED_MODEL, "aligner.safetensors")).keys()
