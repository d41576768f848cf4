"""The fused head-mean attention maps (ivtp/ops/fused_maps.py). Without a GPU the Triton kernel runs under
Triton's interpreter, in a subprocess (the interpreter is chosen when the module is imported); tests/gpu runs it
compiled."""

import os
import subprocess
import sys

import pytest
import torch

from ivtp.ops import fused_maps

CHECKS = os.path.join(os.path.dirname(__file__), "fused_maps_checks.py")


def run_interpreted(check: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "IVTP_FUSED_MAPS": "1"}
    done = subprocess.run([sys.executable, CHECKS, check], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr


@pytest.mark.skipif(fused_maps.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("check", ["kernel_against_reference", "model_kept_tokens_match"])
def test_under_the_interpreter(check):
    run_interpreted(check)


def test_cpu_tensors_take_the_torch_ops_unless_interpreted(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_maps.available(torch.zeros(1))
    monkeypatch.setenv("IVTP_FUSED_MAPS", "0")
    assert not fused_maps.available(torch.zeros(1))


def test_tiles_follow_the_grid_size(monkeypatch):
    monkeypatch.setattr(fused_maps, "_multiprocessors", lambda device: 132)  # an H100
    one, sixteen = fused_maps.tiles(1, 577, torch.device("cpu")), fused_maps.tiles(16, 577, torch.device("cpu"))
    assert one == (32, 64) and sixteen == (64, 32)  # 10 row blocks leave SMs idle; 160 do not


def test_a_kernel_failure_is_reported_once_and_the_torch_ops_take_over(monkeypatch, small_llava, images):
    from conftest import batch_of
    from ivtp import apply_pruning
    from ivtp.models import tiny_aligner

    monkeypatch.setattr(fused_maps, "_failed", set())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # available() then takes CPU tensors, as it takes CUDA ones

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(fused_maps, "head_mean_softmax", broken)
    model, processor = small_llava()
    apply_pruning(model, {"vision": {"keep": 32}, "llm": {"layers": 6, "keep": 8, "tau": -1.0}},
                  aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    batch = batch_of(processor, images(1), ["What is it?"])
    with torch.no_grad(), pytest.warns(UserWarning, match="no kernel for this GPU") as caught:
        logits = model(**batch).logits  # the first rollout layer's call fails; every later one skips the kernel
    assert len([w for w in caught if "fused attention-map" in str(w.message)]) == 1
    assert not fused_maps.available(torch.zeros(1))
    kept = model.ivtp_state.last_trace.kept, model.ivtp_state.last_llm_trace.kept_positions
    monkeypatch.setenv("IVTP_FUSED_MAPS", "0")  # the reference: the torch ops from the start
    with torch.no_grad():
        reference = model(**batch).logits
    assert torch.equal(kept[0], model.ivtp_state.last_trace.kept)
    assert all(torch.equal(a, b) for a, b in zip(kept[1], model.ivtp_state.last_llm_trace.kept_positions))
    # The ViT's rollout layers took their output from SDPA (the fused route) rather than from their maps.
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        fused_maps.head_mean_softmax(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 4), 1.0)
