"""Head-mean softmax attention maps fused in Triton (the rollout's lower layers, eq. 2), for CUDA.

A rollout layer needs mean_h softmax(q_h k_h^T * scale): a (B, N, N) map. Built with torch ops, it passes a
(B, H, N, N) float32 tensor through memory four times (the logits, the softmax read and write, the head mean): at
batch 16 on an H100 that was about 1.2 ms per CLIP layer of 577 tokens against 0.08 ms for the layer's fused
attention. Two Triton kernels keep each (rows x keys) tile in registers across the heads and write the map once:

- pass 1, per (row block, head): the row maxima m and softmax denominators l, by online softmax over key
  blocks (two floats per row and head, in a small scratch buffer);
- pass 2, per (row block, key block): exp(s - m) / l summed over the heads, divided by H, stored.

q k^T is computed twice (once per pass); its FLOPs are small next to the memory traffic they replace.

Masks are the ones the probes use: optionally causal (a key after the query is hidden, the query itself never),
and a per-row set of usable keys. `available(t)` says whether the kernel applies to a tensor (CUDA and Triton);
`IVTP_FUSED_MAPS=0` in the environment turns it off. Under `TRITON_INTERPRET=1` it also runs on CPU tensors,
which is how the tests check it without a GPU.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

NEG = -1.0e30  # masked logit: finite, so that a block with every key masked gives no nan in the online max


try:  # Triton ships with PyTorch's Linux CUDA wheels; elsewhere the torch ops in rollout.py serve
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None


def interpreted() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1, read when this module is imported): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_failed: set[str] = set()  # devices where the kernels failed once (`maps`): the torch ops serve from then on


def available(t: torch.Tensor) -> bool:
    """Whether head_mean_softmax can run on tensors like `t`: CUDA with Triton on an Ampere or newer GPU (bf16
    tensor-core products), or a CPU under the interpreter; not where the kernels failed before or where
    IVTP_FUSED_MAPS=0."""
    if os.environ.get("IVTP_FUSED_MAPS", "1") == "0" or triton is None or str(t.device) in _failed:
        return False
    if t.is_cuda:
        return torch.cuda.get_device_capability(t.device) >= (8, 0)
    return interpreted() and t.device.type == "cpu"


def maps(query: torch.Tensor, key: torch.Tensor, scale: float, key_ok: torch.Tensor | None = None,
         causal: bool = False) -> torch.Tensor | None:
    """head_mean_softmax where it is available, else None: the caller then uses the torch ops. A kernel that
    fails to build or launch (a GPU or Triton version it was not tested on) is reported once and not tried
    again on that device, so a run continues on the torch ops instead of stopping."""
    if not available(query):
        return None
    try:
        return head_mean_softmax(query, key, scale, key_ok, causal)
    except Exception as e:  # noqa: BLE001 - Triton reports build and launch failures with many types
        _failed.add(str(query.device))
        warnings.warn(f"ivtp: the fused attention-map kernels failed on {query.device} ({type(e).__name__}: "
                      f"{str(e)[:200]}); using the torch ops from now on (set IVTP_FUSED_MAPS=0 to skip them)")
        return None


if triton is not None:
    _NEG = tl.constexpr(NEG)  # jit functions may read globals that are constexpr only

    @triton.jit
    def _tile(ptr, b, h, idx, dims, s_b, s_h, s_n, s_d, n, d):
        """(len(idx), BLOCK_D) rows `idx` of head h of batch row b of a (B, H, n, d) tensor; rows past n and
        columns past d read as 0."""
        return tl.load(ptr + b * s_b + h * s_h + idx[:, None] * s_n + dims[None, :] * s_d,
                       mask=(idx[:, None] < n) & (dims[None, :] < d), other=0.0)

    @triton.jit
    def _logits(q, k_ptr, rows, cols, dims, b, h, sk_b, sk_h, sk_n, sk_d, ok_ptr, sok_b, n_k, d, scale,
                CAUSAL: tl.constexpr, HAS_OK: tl.constexpr, PRECISION: tl.constexpr):
        """(BLOCK_M, BLOCK_N) scaled logits of one head for query rows `rows` and keys `cols`; masked: NEG."""
        k = _tile(k_ptr, b, h, cols, dims, sk_b, sk_h, sk_n, sk_d, n_k, d)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        allowed = (cols < n_k)[None, :] & (rows >= 0)[:, None]
        if HAS_OK:
            ok = tl.load(ok_ptr + b * sok_b + cols, mask=cols < n_k, other=0)
            allowed = allowed & (ok != 0)[None, :]
        if CAUSAL:  # later keys hidden; the query's own key always visible
            allowed = (allowed & (cols[None, :] <= rows[:, None])) | (cols[None, :] == rows[:, None])
        return tl.where(allowed, s, _NEG)

    @triton.jit
    def _stats_kernel(q_ptr, k_ptr, stats_ptr, ok_ptr, sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sok_b,
                      n_heads, n_q, n_k, d, scale,
                      CAUSAL: tl.constexpr, HAS_OK: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Pass 1, one program per (block of query rows, head, batch row): the softmax's row max and
        denominator, by online softmax over key blocks. stats: (B, H, 2, n_q)."""
        pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < n_q
        q = _tile(q_ptr, b, h, rows, dims, sq_b, sq_h, sq_n, sq_d, n_q, d)
        m = tl.full([BLOCK_M], _NEG, tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_k, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            s = _logits(q, k_ptr, rows, cols, dims, b, h, sk_b, sk_h, sk_n, sk_d, ok_ptr, sok_b, n_k, d, scale,
                        CAUSAL, HAS_OK, PRECISION)
            m_new = tl.maximum(m, tl.max(s, 1))
            den = den * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m = m_new
        stats = stats_ptr + ((b * n_heads + h) * 2) * n_q
        tl.store(stats + rows, m, mask=row_ok)
        tl.store(stats + n_q + rows, den, mask=row_ok)

    @triton.jit
    def _map_kernel(q_ptr, k_ptr, out_ptr, stats_ptr, ok_ptr,
                    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, so_b, so_m, so_n, sok_b,
                    n_heads, n_q, n_k, d, scale,
                    CAUSAL: tl.constexpr, HAS_OK: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Pass 2, one program per (block of query rows, block of keys, batch row): the normalised
        probabilities summed over the heads in registers, divided by H, written once."""
        pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < n_q
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for h in range(n_heads):
            q = _tile(q_ptr, b, h, rows, dims, sq_b, sq_h, sq_n, sq_d, n_q, d)
            stats = stats_ptr + ((b * n_heads + h) * 2) * n_q
            m = tl.load(stats + rows, mask=row_ok, other=0.0)
            den = tl.load(stats + n_q + rows, mask=row_ok, other=1.0)
            s = _logits(q, k_ptr, rows, cols, dims, b, h, sk_b, sk_h, sk_n, sk_d, ok_ptr, sok_b, n_k, d, scale,
                        CAUSAL, HAS_OK, PRECISION)
            acc += tl.exp(s - m[:, None]) / den[:, None]
        tl.store(out_ptr + b * so_b + rows[:, None] * so_m + cols[None, :] * so_n, acc / n_heads,
                 mask=row_ok[:, None] & (cols[None, :] < n_k))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def tiles(batch: int, n_q: int, device: torch.device) -> tuple[int, int]:
    """(rows, keys) of a tile. Measured on an H100 (docs/benchmarks.md) at 577 tokens: with fewer row blocks
    than multiprocessors (one image) 32 x 64 was fastest, 2.2x the torch ops for CLIP-L and 2.4x for a Llama-7B
    probe; with more (16 images) 64 x 32, 5.1x and 5.4x."""
    if batch * -(-n_q // 64) < _multiprocessors(device):
        return 32, 64
    return 64, 32


def head_mean_softmax(query: torch.Tensor, key: torch.Tensor, scale: float, key_ok: torch.Tensor | None = None,
                      causal: bool = False, block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """mean over heads of softmax(query key^T * scale), in float32, computed by two Triton kernels.

    query: (B, H, Nq, Dh), key: (B, H, Nk, Dh) (heads already repeated for GQA); key_ok: (B, Nk) bool, the keys
    a query may see, or None for all; causal: key j is hidden from query i when j > i, and key i is always
    visible to query i (query and key indices are the same tokens). Returns (B, Nq, Nk); each row sums to 1.
    block_m, block_n: the tile (default: `tiles`).
    """
    if triton is None:
        raise RuntimeError("head_mean_softmax needs Triton")
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    if key.shape[:2] != (b, h) or key.shape[3] != d:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not match")
    out = torch.empty(b, n_q, n_k, dtype=torch.float32, device=query.device)
    stats = torch.empty(b, h, 2, n_q, dtype=torch.float32, device=query.device)
    ok = key_ok.to(torch.int8).contiguous() if key_ok is not None else out  # never read without HAS_OK
    if block_m is None or block_n is None:
        block_m, block_n = tiles(b, n_q, query.device)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    common = dict(CAUSAL=causal, HAS_OK=key_ok is not None, PRECISION=precision, BLOCK_M=block_m,
                  BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)))
    rows = triton.cdiv(n_q, block_m)
    _stats_kernel[(rows, h, b)](query, key, stats, ok, *query.stride(), *key.stride(), ok.stride(0),
                                h, n_q, n_k, d, float(scale), **common)
    _map_kernel[(rows, triton.cdiv(n_k, block_n), b)](
        query, key, out, stats, ok, *query.stride(), *key.stride(), *out.stride(), ok.stride(0),
        h, n_q, n_k, d, float(scale), **common)
    return out
