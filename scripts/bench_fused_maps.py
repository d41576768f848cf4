"""Time the fused head-mean attention maps (ivtp/ops/fused_maps.py) against the torch ops on a CUDA GPU.

    python scripts/bench_fused_maps.py [--batch 1 16] [--tokens 577]

Geometries: a CLIP-L/14 rollout layer (16 heads x 64) and a Llama-7B in-LLM probe (32 heads x 128, causal), bf16
inputs, float32 maps. Each tile is timed over 20 calls with CUDA events; docs/benchmarks.md records a run."""

import argparse

import torch

from ivtp.ops import fused_maps
from ivtp.ops.rollout import head_mean_attention

TILES = [(64, 64), (32, 64), (64, 32), (128, 64), (32, 32), (128, 128)]


def milliseconds(fn, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--tokens", type=int, default=577)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    n = args.tokens
    for b in args.batch:
        for heads, dim, causal in ((16, 64, False), (32, 128, True)):
            q, k = (torch.randn(b, heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            ok = torch.ones(b, n, dtype=torch.bool, device="cuda") if causal else None
            mask = None
            if causal:
                tri = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
                mask = torch.where(tri, 0.0, torch.finfo(torch.float32).min)[None, None]
            torch_ms = milliseconds(lambda: head_mean_attention(q, k, dim ** -0.5, mask))
            chosen = fused_maps.tiles(b, n, q.device)
            for bm, bn in TILES:
                ms = milliseconds(lambda: fused_maps.head_mean_softmax(q, k, dim ** -0.5, ok, causal, bm, bn))
                mark = "  <- tiles()" if (bm, bn) == chosen else ""
                print(f"batch {b:2d}, {heads} heads x {dim}{', causal' if causal else ''}: tile {bm:3d} x {bn:3d} "
                      f"{ms:.3f} ms, torch ops {torch_ms:.3f} ms{mark}")


if __name__ == "__main__":
    main()
