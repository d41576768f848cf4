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


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        fused_maps.head_mean_softmax(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 4), 1.0)
