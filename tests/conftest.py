"""Shared fixtures: tiny random LLaVA models (the real transformers classes) and generated images."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ivtp.models import tiny_random


@pytest.fixture
def small_llava():
    """A factory of fresh tiny LLaVAs at 112 px (8x8 = 64 patches) for fast model tests.

    Fresh per call: apply_pruning changes a model in place and refuses a second application.
    """

    def make(seed: int = 0, **vision):
        vision.setdefault("image_size", 112)
        return tiny_random(seed, **vision)

    return make


@pytest.fixture
def images():
    def make(n: int, size: int = 112, seed: int = 0):
        rng = np.random.RandomState(seed)
        return [Image.fromarray((rng.rand(size + 13 * i, size + 7 * i, 3) * 255).astype("uint8")) for i in range(n)]

    return make


def prompt(question: str, image: bool = True) -> str:
    from ivtp.data.templates import vicuna_v1_prompt

    return vicuna_v1_prompt(question, has_image=image)


def batch_of(processor, images, questions, padding_side="left", device="cpu", dtype=None):
    """Processor inputs for one question per row, with its image or None (a text-only row), padded on
    `padding_side`; on `device`, with the pixels in `dtype` if given."""
    processor.tokenizer.padding_side = padding_side
    texts = [prompt(q, image=img is not None) for q, img in zip(questions, images)]
    present = [img for img in images if img is not None]
    batch = processor(images=present or None, text=texts, padding=True, return_tensors="pt").to(device)
    if dtype is not None and "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def assert_cache_matches_recompute(model, batch, new_tokens: int) -> None:
    """Greedy generation with the KV cache equals generation that recomputes everything each step, in tokens and
    in every step's logits (so a wrong decode mask cannot hide behind an argmax tie)."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        cached = model.generate(**batch, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def assert_static_cache_matches_dynamic(model, batch, new_tokens: int) -> None:
    """Greedy generation on a static KV cache (preallocated, every layer as long as the longest) equals generation
    on the default dynamic cache, in tokens and in every step's logits. Twice: the second run reuses the first
    one's cache after `reset()`, as a caller may, and must not read the pruned segments of the first."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        dynamic = model.generate(**batch, **kwargs)
        static = model.generate(**batch, cache_implementation="static", **kwargs)
        cache = static.past_key_values
        cache.reset()
        again = model.generate(**batch, past_key_values=cache, **kwargs)
    assert again.past_key_values is cache
    for run in (static, again):
        assert torch.equal(run.sequences, dynamic.sequences)
        for a, b in zip(run.logits, dynamic.logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def assert_trains(module, x, tokens: int, out_dim: int):
    """A projector maps x (B, N, Dv) to (B, tokens, out_dim), and a loss on its output reaches x and every parameter.
    Returns the module."""
    x = x.clone().requires_grad_(True)
    out = module(x)  # (B, N, Dv) -> (B, tokens, Dl)
    assert out.shape == (x.shape[0], tokens, out_dim)
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    return module


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_deepspeed = pytest.mark.skipif(shutil.which("deepspeed", path=os.path.dirname(sys.executable)) is None,
                                     reason="the deepspeed launcher is installed with the package")


def run_deepspeed_zero3(script: str, *argv: str) -> None:
    """One process of `deepspeed train/<script>` under ZeRO-3 on the CPU, on a free port; asserts it succeeds."""
    from ivtp.testbed.pipeline import free_port

    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "1", "--master_port",
           str(free_port()), os.path.join(ROOT, "train", script),
           "--deepspeed", os.path.join(ROOT, "configs", "deepspeed", "zero3.json"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
