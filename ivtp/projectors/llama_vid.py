"""LLaMA-VID's token generation (Li et al., "LLaMA-VID: An Image is Worth 2 Tokens in Large Language Models", ECCV
2024; dvlab-research/LLaMA-VID, `vlm_attention` and `token_generation` in llamavid/model/llamavid_arch.py):

- context token: a Q-Former (32 learned queries beside the instruction's tokens, BERT-style post-norm layers with
  a cross-attention to the normalised image features every second layer) gives text-conditioned queries; projected
  to the vision width, each attends (softmax over the patches, scaled by the vision width) to *keys* made by a
  linear map of the raw patch features, and gathers the raw features themselves; the queries' mean, through a
  linear map to the LLM width, is the context token;
- content tokens: the patch grid average-pooled to s x s (LLaMA-VID's `compress_type grid:s`), then LLaVA's
  two-linear GELU projector (its mm_projector, mlp2x_gelu).

The image gives [context, content_1 .. content_{s*s}]: num_tokens + 1 tokens (65 at num_tokens 64).

Where we differ, because the instruction reaches us as LLM tokens (docs/methods.md): the Q-Former reads the LLM's
own input embeddings of the instruction (a linear map to its width, plus learned positions; the last 256 tokens,
as LLaMA-VID truncates its BERT input from the left) instead of BERT's tokenizer and word embeddings, and it starts
from random weights (LLaMA-VID starts from InstructBLIP's Q-Former). A row without instruction tokens runs the
queries alone: its context token is the image's, read by the learned queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ivtp.projectors.honeybee import square_side
from ivtp.projectors.qwen_vl import gelu_mlp


class Attention(nn.Module):
    """BERT attention: biased q/k/v from (B, L, W) queries and (B, M, D_kv) keys/values, SDPA, biased output."""

    def __init__(self, width: int, heads: int, kv_width: int | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        kv_width = kv_width or width
        self.q, self.out = nn.Linear(width, width), nn.Linear(width, width)
        self.k, self.v = nn.Linear(kv_width, width), nn.Linear(kv_width, width)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, heads, L, W / heads)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M): True = attend
        out = F.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(memory)),
                                             self.split(self.v(memory)), attn_mask=mask)  # (B, heads, L, W/heads)
        return self.out(out.transpose(1, 2).flatten(2))  # (B, L, W)


def feed_forward(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


class QFormerLayer(nn.Module):
    """One Q-Former layer (post-norm, as BERT): self-attention over [queries; text]; for the queries alone a
    cross-attention to the image (in layers that have one); then separate feed-forwards for queries and text."""

    def __init__(self, width: int, heads: int, image_width: int, cross: bool):
        super().__init__()
        self.self_attn, self.self_norm = Attention(width, heads), nn.LayerNorm(width, eps=1e-12)
        self.cross_attn = Attention(width, heads, image_width) if cross else None
        self.cross_norm = nn.LayerNorm(width, eps=1e-12) if cross else None
        self.query_ffn, self.query_norm = feed_forward(width), nn.LayerNorm(width, eps=1e-12)
        self.text_ffn, self.text_norm = feed_forward(width), nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, n_queries: int) -> torch.Tensor:
        """x: (B, Q + T, W) queries then text; mask: (B, Q + T) True where a token is real; image: (B, N, Dv)."""
        x = self.self_norm(x + self.self_attn(x, x, mask))
        queries, text = x[:, :n_queries], x[:, n_queries:]  # (B, Q, W), (B, T, W)
        if self.cross_attn is not None:
            queries = self.cross_norm(queries + self.cross_attn(queries, image))
        queries = self.query_norm(queries + self.query_ffn(queries))
        text = self.text_norm(text + self.text_ffn(text))
        return torch.cat([queries, text], dim=1)


class TextQueries(nn.Module):
    """The Q-Former of LLaMA-VID: (B, N, Dv) image, (B, T, D_text) instruction embeddings and their (B, T) mask
    -> (B, num_queries, W) query states."""

    def __init__(self, image_width: int, text_width: int, width: int, layers: int, heads: int, num_queries: int,
                 cross_every: int, max_text: int):
        super().__init__()
        self.max_text = max_text
        self.queries = nn.Parameter(torch.zeros(1, num_queries, width))
        self.text_in = nn.Linear(text_width, width)
        self.text_pos = nn.Embedding(max_text, width)
        self.embed_norm = nn.LayerNorm(width, eps=1e-12)
        self.image_norm = nn.LayerNorm(image_width)  # LLaMA-VID's vlm_att_ln (InstructBLIP's ln_vision)
        self.layers = nn.ModuleList(QFormerLayer(width, heads, image_width, cross=i % cross_every == 0)
                                    for i in range(layers))

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        text, text_mask = text[:, -self.max_text:], text_mask[:, -self.max_text:]  # keep the last max_text
        b, t, _ = text.shape
        queries = self.queries.expand(b, -1, -1)  # (B, Q, W)
        words = self.text_in(text) + self.text_pos.weight[:t]  # (B, T, W)
        x = self.embed_norm(torch.cat([queries, words], dim=1))  # (B, Q + T, W)
        mask = torch.cat([text_mask.new_ones(b, queries.shape[1]), text_mask], dim=1)  # (B, Q + T)
        image = self.image_norm(image)
        for layer in self.layers:
            x = layer(x, mask, image, queries.shape[1])
        return x[:, : queries.shape[1]]  # (B, Q, W)


class LlamaVidProjector(nn.Module):
    """(B, N, D_vision) patches, (B, T, D_text) instruction embeddings, (B, T) mask -> (B, num_tokens + 1, D_llm):
    the context token, then num_tokens content tokens.

    The Q-Former's defaults are BERT-base's geometry where the vision tower is wide enough (width 768, 12 layers,
    heads width // 64, cross-attention every 2nd layer, 32 queries); a narrower tower gets width = its own width."""

    text_conditioned = True

    def __init__(self, vision_hidden: int, llm_hidden: int, num_tokens: int = 64, num_patches: int = 576,
                 text_hidden: int | None = None, width: int | None = None, layers: int = 12, heads: int | None = None,
                 num_queries: int = 32, cross_every: int = 2, max_text: int = 256):
        super().__init__()
        width = width or min(768, vision_hidden)
        self.in_side = square_side(num_patches, "the number of patches")
        self.out_side = square_side(num_tokens, "llama_vid's num_tokens (content tokens)")
        self.tokens_per_image = num_tokens + 1
        self.text_hidden = text_hidden or llm_hidden
        self.text_queries = TextQueries(vision_hidden, self.text_hidden, width, layers, heads or max(1, width // 64),
                                        num_queries, cross_every, max_text)
        self.query_proj = nn.Linear(width, vision_hidden)  # LLaMA-VID's vlm_att_projector
        self.key_proj = nn.Linear(vision_hidden, vision_hidden)  # vlm_att_key_projector
        self.value_proj = nn.Linear(vision_hidden, llm_hidden)  # vlm_att_val_projector
        self.readout = gelu_mlp(vision_hidden, llm_hidden)  # mm_projector on the content tokens
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation for the Q-Former (normal, std 0.02; zero biases; norms at one and zero; the
        queries normal, std 0.02, as LLaMA-VID initialises its own); torch's default for the linear maps around it,
        which LLaMA-VID creates as plain nn.Linear."""
        for m in self.text_queries.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.text_queries.queries, std=0.02)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape  # (B, N, Dv)
        if n != self.in_side ** 2:
            raise ValueError(f"llama_vid was built for {self.in_side ** 2} patches, got {n}")
        if text is None:  # no instruction at all: the queries alone
            text = x.new_zeros(b, 0, self.text_hidden)
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=x.device)
        context = self.context(x, text.to(x.dtype), text_mask.bool())  # (B, 1, Dl)
        grid = x.transpose(1, 2).reshape(b, d, self.in_side, self.in_side)  # (B, Dv, S, S)
        content = F.adaptive_avg_pool2d(grid, self.out_side).flatten(2).transpose(1, 2)  # (B, s*s, Dv)
        return torch.cat([context, self.readout(content)], dim=1)  # (B, 1 + s*s, Dl)

    def context(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The context token: (B, N, Dv) patches -> (B, 1, Dl)."""
        queries = self.query_proj(self.text_queries(x, text, text_mask))  # (B, Q, Dv)
        scores = queries @ self.key_proj(x).transpose(1, 2) / x.shape[-1] ** 0.5  # (B, Q, N)
        gathered = scores.softmax(-1) @ x  # (B, Q, Dv): the raw features, as LLaMA-VID's values
        return self.value_proj(gathered.mean(1, keepdim=True))  # (B, 1, Dl)
