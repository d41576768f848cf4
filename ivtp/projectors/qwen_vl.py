"""Qwen-VL's position-aware vision-language adapter (Bai et al., "Qwen-VL", 2023; the `Resampler` of the Qwen/Qwen-VL
hub repository's visual.py and the lines after it in its `VisionTransformer`):

    keys/values: LayerNorm(kv_proj(patches));  queries: LayerNorm(learned queries)
    one multi-head cross-attention; queries get the 2-D sin-cos table of their s x s grid added, keys the same
    table resized (bicubic) to the patch grid; values get none
    then LayerNorm and a square projection without bias (Qwen-VL's ln_post and proj)

Inside LLaVA-1.5 the adapter's output then goes through LLaVA's two-linear GELU projector to the LLM width (our
reading of IVTP's Table 9: its 0.003 TFLOPs for the Qwen-VL adapter is what one cross-attention layer costs at the
vision width, 1024, with 64 queries; at the LLM width, 4096, it would cost 0.05). docs/methods.md has the details.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ivtp.projectors.honeybee import square_side


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): sines then cosines at frequencies 1 / 10000^(i / (dim/2))."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.double()[:, None] * freqs[None]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """(side*side, dim) table for a row-major side x side grid: the first half encodes the column, the second the
    row (the MAE table Qwen-VL uses). float32."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # (side, side) each
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


def resize_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """A (s*s, D) grid table resized to (side*side, D), bicubic, as Qwen-VL fits its query table to the keys."""
    src = square_side(table.shape[0], "the table length")
    if src == side:
        return table
    grid = table.reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, D, s, s)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)  # (1, D, side, side)
    return grid.permute(0, 2, 3, 1).reshape(side * side, -1)


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, Q, W) over keys and values (B, N, W), with biased in/out projections
    (torch's nn.MultiheadAttention, as Qwen-VL uses it)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, heads, L, W / heads)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self.split(self.q(queries)), self.split(self.k(keys)),
                                             self.split(self.v(values)))  # (B, heads, Q, W / heads)
        return self.out(out.transpose(1, 2).flatten(2))  # (B, Q, W)


def gelu_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA-1.5's projector: Linear(in, out), GELU, Linear(out, out)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class QwenVLResampler(nn.Module):
    """(B, N, D_vision) patches on a square grid -> (B, num_tokens, D_llm), num_tokens learned queries on a grid.

    width: the attention width (default the vision width); heads: width // 128 as in Qwen-VL (at least 1)."""

    text_conditioned = False

    def __init__(self, vision_hidden: int, llm_hidden: int, num_tokens: int = 64, num_patches: int = 576,
                 width: int | None = None, heads: int | None = None):
        super().__init__()
        width = width or vision_hidden
        self.query_side = square_side(num_tokens, "qwen_vl's num_tokens")
        self.key_side = square_side(num_patches, "the number of patches")
        self.tokens_per_image = num_tokens
        self.query = nn.Parameter(torch.zeros(num_tokens, width))
        # Fixed tables (not trained, not saved: rebuilt from the geometry).
        table = sincos_2d(width, self.query_side)  # (Q, W)
        self.register_buffer("query_pos", table, persistent=False)
        self.register_buffer("key_pos", resize_table(table, self.key_side), persistent=False)  # (N, W)
        self.kv_proj = nn.Identity() if width == vision_hidden else nn.Linear(vision_hidden, width, bias=False)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(width, eps=1e-6) for _ in range(3))
        self.attn = CrossAttention(width, heads or max(1, width // 128))
        self.proj = nn.Parameter(torch.empty(width, width))
        self.readout = gelu_mlp(width, llm_hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Qwen-VL's initialisation: queries and linears truncated normal (std 0.02), zero biases, norms at one
        and zero, the output projection normal with std width^-1/2. The readout keeps torch's default, as LLaVA's
        projector does."""
        nn.init.trunc_normal_(self.query, std=0.02)
        for m in [self.kv_proj, self.attn.q, self.attn.k, self.attn.v, self.attn.out]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for norm in (self.ln_q, self.ln_kv, self.ln_post):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        nn.init.normal_(self.proj, std=self.proj.shape[0] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape  # (B, N, Dv)
        if n != self.key_side ** 2:
            raise ValueError(f"qwen_vl was built for {self.key_side ** 2} patches, got {n}")
        kv = self.ln_kv(self.kv_proj(x))  # (B, N, W)
        q = self.ln_q(self.query)[None].expand(b, -1, -1)  # (B, Q, W)
        pos_q, pos_k = self.query_pos.to(kv.dtype), self.key_pos.to(kv.dtype)
        out = self.attn(q + pos_q, kv + pos_k, kv)  # (B, Q, W)
        out = self.ln_post(out) @ self.proj  # (B, Q, W)
        return self.readout(out)  # (B, Q, Dl)
