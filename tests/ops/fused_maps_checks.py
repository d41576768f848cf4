"""Checks of ivtp/ops/fused_maps.py that run under Triton's interpreter (TRITON_INTERPRET=1, set before import):
test_fused_maps.py runs each in a subprocess, so that a CPU machine tests the kernel itself. Each prints OK."""

import sys

import numpy as np
import torch

from ivtp.ops import fused_maps
from ivtp.ops.rollout import head_mean_attention

NEG = torch.finfo(torch.float32).min


def reference(q, k, scale, key_ok=None, causal=False):
    b, _, n_q, _ = q.shape
    n_k = k.shape[2]
    allowed = torch.ones(b, n_q, n_k, dtype=torch.bool)
    if key_ok is not None:
        allowed &= key_ok[:, None, :]
    if causal:
        tri = torch.ones(n_q, n_k, dtype=torch.bool).tril()
        allowed = (allowed & tri) | torch.eye(n_q, n_k, dtype=torch.bool)
    return head_mean_attention(q, k, scale, torch.where(allowed, 0.0, NEG)[:, None])


def kernel_against_reference():
    assert fused_maps.available(torch.zeros(1))  # the interpreter takes CPU tensors
    g = torch.Generator().manual_seed(0)
    # (B, H, Nq, Nk, Dh): blocks that do not divide the tokens, a head dim that is no power of two, Nq != Nk
    for b, h, n_q, n_k, d in [(2, 3, 50, 50, 16), (1, 2, 70, 70, 40), (2, 1, 9, 77, 8), (1, 4, 130, 130, 64)]:
        q = torch.randn(b, n_q, h, d, generator=g).transpose(1, 2)  # strided, as the projections leave them
        k = torch.randn(b, h, n_k, d, generator=g) * 2
        ok = torch.rand(b, n_k, generator=g) > 0.3
        cases = [(None, False), (ok, False)] + ([(ok, True), (None, True)] if n_q == n_k else [])
        for (key_ok, causal), (bm, bn) in zip(cases, [(32, 64), (64, 32), (64, 64), (16, 16)]):  # tiles vary too
            got = fused_maps.head_mean_softmax(q, k, d ** -0.5, key_ok, causal=causal, block_m=bm, block_n=bn)
            torch.testing.assert_close(got, reference(q, k, d ** -0.5, key_ok, causal), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.sum(-1), torch.ones(b, n_q), rtol=1e-5, atol=1e-5)
    # large logits: the online max keeps exp from overflowing
    q = torch.randn(1, 2, 40, 16, generator=g) * 30
    torch.testing.assert_close(fused_maps.head_mean_softmax(q, q, 1.0), reference(q, q, 1.0), rtol=1e-5, atol=1e-6)


def model_kept_tokens_match():
    """tiny-random IVTP: the fused maps (stage 1 and stage 2) against the torch ops, in one process."""
    import os

    from ivtp import apply_pruning
    from ivtp.data.templates import vicuna_v1_prompt
    from ivtp.models import tiny_aligner, tiny_random

    model, processor = tiny_random(0, image_size=112)
    apply_pruning(model, {"vision": {"keep": 32}, "llm": {"layers": 6, "group_size": 3, "keep": 8, "tau": -1.0}},
                  aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    rng = np.random.RandomState(0)
    from PIL import Image

    images = [Image.fromarray((rng.rand(112, 112, 3) * 255).astype("uint8")) for _ in range(2)]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=[vicuna_v1_prompt("What colour is the circle?"),
                                           vicuna_v1_prompt("Is there a red square at the top?")],
                      padding=True, return_tensors="pt")
    calls, kernel = [], fused_maps.head_mean_softmax

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    fused_maps.head_mean_softmax = counted  # the patches call it through the module
    runs = {}
    for flag in ("1", "0"):
        os.environ["IVTP_FUSED_MAPS"] = flag
        calls.clear()
        with torch.no_grad():
            logits = model(**batch).logits
        # rollout groups of 3: two lower layers each; 7 ViT layers feed layer -2 (groups 0-2, 3-5, 6), and 6 LLM
        assert len(calls) == (4 + 4 if flag == "1" else 0), calls
        state = model.ivtp_state
        runs[flag] = (logits, state.last_trace.kept, state.last_llm_trace.kept_positions,
                      state.last_trace.scores, state.last_llm_trace.scores)
    fused, plain = runs["1"], runs["0"]
    assert torch.equal(fused[1], plain[1])  # stage 1 keeps the same patches
    assert all(torch.equal(a, b) for a, b in zip(fused[2], plain[2]))  # stage 2 the same tokens
    for a, b in zip(fused[3] + fused[4], plain[3] + plain[4]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    print("OK")
