"""Honeybee's C-Abstractor (Cha et al., "Honeybee: Locality-enhanced Projector for Multimodal LLM", CVPR 2024),
as its authors' code (kakaobrain/honeybee, `CAbstractor`, configs/model_config/c-abs.yaml) builds it:

    patches + learned position embedding -> RegNet stage (depth 3) -> adaptive average pooling to s x s
    -> RegNet stage (depth 3) -> MLP readout (depth 2, SiLU)

A RegNet stage is timm's `RegStage` as Honeybee configures it: bottleneck blocks with stride 1, bottleneck ratio
1, depthwise 3x3 convolutions (group size 1), squeeze-excitation at a quarter of the block's input width, SiLU,
and LayerNorm over channels. It is written out here in plain torch (no timm), block for block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map. eps 1e-5: Honeybee names timm's LayerNorm2d (1e-6), but
    timm's conv blocks build it as their LayerNormAct2d, whose default is 1e-5, and that is what runs."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_norm(in_ch: int, out_ch: int, kernel: int, groups: int = 1) -> nn.Sequential:
    """Convolution (no bias: the norm after it has one), then the channel norm."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, ChannelNorm(out_ch))


class SqueezeExcite(nn.Module):
    """Channel gates from the map's spatial mean: 1x1 conv down to `reduced`, SiLU, 1x1 conv up, sigmoid."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.down = nn.Conv2d(channels, reduced, 1)
        self.up = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        gate = self.up(F.silu(self.down(x.mean((2, 3), keepdim=True))))  # (B, C, 1, 1)
        return x * gate.sigmoid()


class RegBlock(nn.Module):
    """One RegNet bottleneck at stride 1 and bottleneck ratio 1: 1x1 conv + norm + SiLU, depthwise 3x3 conv + norm
    + SiLU, squeeze-excitation (sized from the block's *input* width, as timm does), 1x1 conv + norm, the shortcut
    added (a 1x1 conv + norm where the width changes), then SiLU."""

    def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.25):
        super().__init__()
        self.expand = conv_norm(in_ch, out_ch, 1)
        self.spatial = conv_norm(out_ch, out_ch, 3, groups=out_ch)
        self.excite = SqueezeExcite(out_ch, max(1, round(in_ch * se_ratio)))
        self.reduce = conv_norm(out_ch, out_ch, 1)
        self.shortcut = nn.Identity() if in_ch == out_ch else conv_norm(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        y = F.silu(self.expand(x))
        y = self.excite(F.silu(self.spatial(y)))
        return F.silu(self.reduce(y) + self.shortcut(x))


def reg_stage(depth: int, in_ch: int, out_ch: int) -> nn.Sequential:
    """`depth` blocks; the first changes the width."""
    return nn.Sequential(*[RegBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(depth)])


def silu_mlp(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    """Honeybee's readout: Linear(in, out), then (SiLU, Linear(out, out)) depth - 1 times."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def square_side(count: int, what: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{what} must be a square number (a grid), got {count}")
    return side


class CAbstractor(nn.Module):
    """(B, N, D_vision) patch features on a square grid -> (B, num_tokens, D_llm).

    hidden: the width of both RegNet stages (Honeybee: 1024, CLIP ViT-L's width; default the vision width).
    depth: blocks per stage (3); mlp_depth: readout linears (2); num_patches: N, for the learned position table."""

    text_conditioned = False

    def __init__(self, vision_hidden: int, llm_hidden: int, num_tokens: int = 64, num_patches: int = 576,
                 hidden: int | None = None, depth: int = 3, mlp_depth: int = 2):
        super().__init__()
        hidden = hidden or vision_hidden
        self.in_side = square_side(num_patches, "the number of patches")
        self.out_side = square_side(num_tokens, "honeybee's num_tokens")
        self.tokens_per_image = num_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, vision_hidden))
        self.stage1 = reg_stage(depth, vision_hidden, hidden)
        self.stage2 = reg_stage(depth, hidden, hidden)
        self.readout = silu_mlp(mlp_depth, hidden, llm_hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Honeybee's initialisation: position table truncated normal (std 0.02); convolutions and linears normal
        (std 0.02) with zero biases; norms at one and zero."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (B, N, Dv)
        if n != self.in_side ** 2:
            raise ValueError(f"honeybee was built for {self.in_side ** 2} patches, got {n}")
        x = (x + self.pos_embed).transpose(1, 2).reshape(b, d, self.in_side, self.in_side)  # (B, Dv, S, S)
        x = self.stage1(x)  # (B, H, S, S)
        x = F.adaptive_avg_pool2d(x, self.out_side)  # (B, H, s, s)
        x = self.stage2(x)  # (B, H, s, s)
        return self.readout(x.flatten(2).transpose(1, 2))  # (B, s*s, Dl), row-major over the grid
