"""FLOPs of one LLaVA-1.5 prefill (batch 1), priced from architecture dimensions only.

The convention is our reading of IVTP's Tables 1-3 and 9; docs/flops.md says how it was found, which printed
numbers it reproduces and which it does not.

  * One multiply-accumulate is 2 FLOPs.
  * Counted: every dense matmul. ViT layer: q, k, v, o and both MLP linears. LLM layer: q, o, k and v (k and v
    are scaled by kv_heads / heads), and gate, up and down. Attention: QK^T and AV over the whole n x n score
    matrix, with no discount for the causal mask. The LM head: priced on every position of the prompt, because a
    plain LLaVA forward computes logits for all of them.
  * Not counted: norms, softmax, activations, residual adds, RoPE, biases, embedding lookups and the patch
    embedding. Together they are under 0.1% of the total. The projector is also left out, because including it
    breaks the paper's 15.364 total. Pass `projector_flops` through `extra` if you want it priced.
  * The ViT is priced up to the layer whose output LLaVA reads. That is `vision_feature_layer`, -2 for
    LLaVA-1.5, so 23 of the 24 CLIP layers are priced.

Every per-layer cost depends only on that layer's token count, so any pruning schedule is priced exactly by
giving one count per layer. Part functions return integer FLOPs. `llava_flops` reports TFLOPs (1e12 FLOPs),
the unit the paper prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral

TERA = 10**12  # FLOPs per TFLOP


@dataclass(frozen=True)
class Arch:
    """The dimensions of a LLaVA model that its FLOPs depend on. Nothing else: no weights, no tokenizer.

    Vision tower (CLIP ViT): width `vision_hidden`, MLP width `vision_intermediate`, `vision_layers` layers,
    `vision_heads` heads, and square images of `image_size` px cut into `patch_size` px patches.
    LLM (Llama/Vicuna): width `llm_hidden`, SwiGLU width `llm_intermediate`, `llm_layers` layers, `llm_heads`
    query heads and `llm_kv_heads` key/value heads, vocabulary `vocab`.
    Projector: vision_hidden -> `projector_hidden` -> llm_hidden (two linears with a GELU between them).
    `vision_feature_layer` is LLaVA's hidden-state index: -2 is the output of the next-to-last layer, and k >= 1
    is the output of layer k. Only the layers up to that one are priced.
    """

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    vocab: int
    projector_hidden: int
    vision_feature_layer: int = -2
    name: str = ""

    def __post_init__(self) -> None:
        for field in _ARCH_SIZES:
            _check_positive(getattr(self, field), f"Arch.{field}")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"vision_hidden {self.vision_hidden} is not divisible by vision_heads {self.vision_heads}")
        if self.llm_hidden % self.llm_heads:
            raise ValueError(f"llm_hidden {self.llm_hidden} is not divisible by llm_heads {self.llm_heads}")
        if self.llm_heads % self.llm_kv_heads:
            raise ValueError(f"llm_heads {self.llm_heads} is not a multiple of llm_kv_heads {self.llm_kv_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _feature_depth(self.vision_feature_layer, self.vision_layers)  # raises on an impossible layer

    @property
    def num_patches(self) -> int:
        """Patch tokens per image: (image_size / patch_size)^2. 576 for CLIP ViT-L/14 at 336 px."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def vit_sequence(self) -> int:
        """Tokens in each unpruned ViT layer: the patches plus the [CLS] token (577 for LLaVA-1.5)."""
        return self.num_patches + 1

    @property
    def vit_layers_priced(self) -> int:
        """How many CLIP layers produce the features LLaVA reads: 23 of 24 for vision_feature_layer -2."""
        return _feature_depth(self.vision_feature_layer, self.vision_layers)

    @property
    def projector_dims(self) -> tuple[int, int, int]:
        """(in, hidden, out) widths of the two-linear projector."""
        return (self.vision_hidden, self.projector_hidden, self.llm_hidden)

    @classmethod
    def from_llava_config(cls, config, name: str = "") -> "Arch":
        """Read the dimensions from a transformers `LlavaConfig` (its `vision_config` and `text_config`).

        A list-valued `vision_feature_layer` (features concatenated from several layers) is priced to its deepest
        layer, because every layer up to that one has to run.
        """
        v, t = config.vision_config, config.text_config
        feature_layer = getattr(config, "vision_feature_layer", -2)
        if isinstance(feature_layer, (list, tuple)):
            feature_layer = max(feature_layer, key=lambda k: _feature_depth(k, v.num_hidden_layers))
        kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
        return cls(
            vision_hidden=v.hidden_size,
            vision_intermediate=v.intermediate_size,
            vision_layers=v.num_hidden_layers,
            vision_heads=v.num_attention_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            llm_hidden=t.hidden_size,
            llm_intermediate=t.intermediate_size,
            llm_layers=t.num_hidden_layers,
            llm_heads=t.num_attention_heads,
            llm_kv_heads=kv_heads,
            vocab=t.vocab_size,
            # LLaVA's projector is Linear(vision, text) -> GELU -> Linear(text, text): its hidden width is the LLM's.
            projector_hidden=t.hidden_size,
            vision_feature_layer=int(feature_layer),
            name=name,
        )

    @classmethod
    def llava_1_5_7b(cls) -> "Arch":
        """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px with Vicuna-7B (vocabulary 32064, as in the llava-hf checkpoints)."""
        return cls(**_CLIP_L14_336, **_vicuna(4096, 11008, 32, 32), name="llava-1.5-7b")

    @classmethod
    def llava_1_5_13b(cls) -> "Arch":
        """LLaVA-1.5-13B: the same vision tower with Vicuna-13B."""
        return cls(**_CLIP_L14_336, **_vicuna(5120, 13824, 40, 40), name="llava-1.5-13b")


# The Arch fields that are sizes (positive ints). A constant, only read.
_ARCH_SIZES = (
    "vision_hidden", "vision_intermediate", "vision_layers", "vision_heads", "image_size", "patch_size",
    "llm_hidden", "llm_intermediate", "llm_layers", "llm_heads", "llm_kv_heads", "vocab", "projector_hidden",
)

# Constant keyword sets for the presets. They are only read, never changed.
_CLIP_L14_336 = dict(
    vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16, image_size=336, patch_size=14
)


def _vicuna(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return dict(
        llm_hidden=hidden,
        llm_intermediate=intermediate,
        llm_layers=layers,
        llm_heads=heads,
        llm_kv_heads=heads,  # Vicuna v1.5 has no grouped-query attention
        vocab=32064,
        projector_hidden=hidden,
    )


def arch_preset(name: str) -> Arch:
    """An Arch by name: 'llava-1.5-7b' or 'llava-1.5-13b'. Meant for a CLI flag."""
    presets = {"llava-1.5-7b": Arch.llava_1_5_7b, "llava-1.5-13b": Arch.llava_1_5_13b}
    if name not in presets:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(presets)}")
    return presets[name]()


def _feature_depth(feature_layer: int, layers: int) -> int:
    """How many layers run to produce hidden state `feature_layer`.

    HF's hidden_states has layers + 1 entries (the embeddings, then one per layer). So index k >= 1 is the output
    of layer k, and a negative index counts from the end (-1 is the last layer, -2 the one before it).
    """
    depth = feature_layer if feature_layer >= 0 else layers + 1 + feature_layer
    if not 1 <= depth <= layers:
        raise ValueError(
            f"vision_feature_layer {feature_layer} does not name one of the {layers} layers' outputs "
            f"(use 1..{layers} or -{layers}..-1)"
        )
    return depth


# ---------------------------------------------------------------------------------------------- per-layer costs


def vit_layer_flops(arch: Arch, n: int) -> int:
    """FLOPs of one CLIP encoder layer over n tokens (patches plus [CLS]).

    Per token: q, k, v, o (4 d^2 MACs) and the MLP (2 d f MACs). Per layer: QK^T and AV, each n^2 d MACs summed
    over the heads (heads x head_dim = d).
    """
    d, f = arch.vision_hidden, arch.vision_intermediate
    macs = n * (4 * d * d + 2 * d * f) + 2 * n * n * d
    return 2 * macs


def llm_layer_flops(arch: Arch, n: int) -> int:
    """FLOPs of one Llama decoder layer over n tokens (visual plus text).

    Per token: q and o (d^2 MACs each), k and v (d * d_kv MACs each, where d_kv = d * kv_heads / heads), and the
    SwiGLU MLP (gate, up, down: 3 d f MACs). Per layer: QK^T and AV over the full n x n matrix (n^2 d MACs
    each). A causal kernel skips about half of that matrix. The paper's totals need the full square, so we count
    it.
    """
    d, f = arch.llm_hidden, arch.llm_intermediate
    d_kv = d * arch.llm_kv_heads // arch.llm_heads
    macs = n * (2 * d * d + 2 * d * d_kv + 3 * d * f) + 2 * n * n * d
    return 2 * macs


def lm_head_flops(arch: Arch, n: int) -> int:
    """FLOPs of the LM head on n positions: an (n, d) x (d, vocab) matmul."""
    return 2 * n * arch.llm_hidden * arch.vocab


def projector_flops(arch: Arch, n_visual: int) -> int:
    """FLOPs of the two-linear projector on n_visual tokens. It is not part of the paper's ViT or LLM columns."""
    _check_count(n_visual, "n_visual")
    d_in, d_hidden, d_out = arch.projector_dims
    return 2 * n_visual * (d_in * d_hidden + d_hidden * d_out)


# ---------------------------------------------------------------------------------------------- whole towers


def vit_flops(arch: Arch, tokens_per_layer: Sequence[int]) -> int:
    """FLOPs of the CLIP layers that LLaVA's features depend on.

    tokens_per_layer: one count per priced layer (arch.vit_layers_priced of them, 23 for LLaVA-1.5). Each count
    is the number of tokens, [CLS] included, that the layer runs on, so a schedule that prunes between layers is
    priced exactly. Returns FLOPs (int).
    """
    counts = _check_counts(tokens_per_layer, arch.vit_layers_priced, "vit_tokens_per_layer", _vit_hint(arch))
    return sum(vit_layer_flops(arch, n) for n in counts)


def llm_flops(arch: Arch, tokens_per_layer: Sequence[int], lm_head: bool = True) -> int:
    """FLOPs of the decoder layers, plus the LM head on the positions left after the last layer.

    tokens_per_layer: one count per decoder layer (arch.llm_layers of them), visual plus text tokens. Returns
    FLOPs (int).
    """
    counts = _check_counts(tokens_per_layer, arch.llm_layers, "llm_tokens_per_layer", "one per decoder layer")
    total = sum(llm_layer_flops(arch, n) for n in counts)
    return total + (lm_head_flops(arch, counts[-1]) if lm_head else 0)


def llava_flops(
    arch: Arch,
    text_tokens: int,
    vit_tokens_per_layer: Sequence[int] | None = None,
    llm_visual_per_layer: Sequence[int] | None = None,
    extra: float = 0.0,
    crops: int = 1,
    crop_vit_tokens: Sequence[Sequence[int]] | None = None,
) -> dict:
    """The paper's breakdown (Table 9) for one image and `text_tokens` text tokens, in TFLOPs.

    vit_tokens_per_layer: tokens ([CLS] included) in each priced CLIP layer of one crop. Default: unpruned, 577 in
        each of 23.
    crops: passes of the tower per image, each at vit_tokens_per_layer (LLaVA-NeXT's AnyRes: the base view and
        each tile; 1 for LLaVA-1.5).
    crop_vit_tokens: instead of the two above, each crop's own vit_tokens_per_layer (LLaVA-NeXT with per-image
        budgets, whose crops keep different counts); 'vit_tokens' then reports the first crop's.
    llm_visual_per_layer: visual tokens in each decoder layer. The text tokens are added to every layer.
        Default: unpruned, 576 in each layer.
    extra: TFLOPs of anything outside the two towers (scoring, a text encoder, a resampler). It is reported
        as is, because the paper gives it its own column.

    Returns {'vit', 'llm', 'extra', 'total'} in TFLOPs, 'vit_tokens' and 'llm_tokens' (the per-layer counts that
    were priced), and 'llm_equivalent_visual_tokens' (the visual count averaged over the decoder layers: the
    constant count that would cost the same in the layers' linear part).
    """
    _check_count(text_tokens, "text_tokens")
    if isinstance(extra, bool) or not isinstance(extra, (int, float)) or not math.isfinite(extra) or extra < 0:
        raise ValueError(f"extra must be a finite, non-negative number of TFLOPs, got {extra!r}")
    if vit_tokens_per_layer is None:
        vit_tokens_per_layer = [arch.vit_sequence] * arch.vit_layers_priced
    if llm_visual_per_layer is None:
        llm_visual_per_layer = [arch.num_patches] * arch.llm_layers
    if crop_vit_tokens is None:
        crop_vit_tokens = [vit_tokens_per_layer] * _check_positive(crops, "crops")
    elif crops != len(crop_vit_tokens):
        raise ValueError(f"crop_vit_tokens has {len(crop_vit_tokens)} crops, crops says {crops}")
    per_crop = [_check_counts(t, arch.vit_layers_priced, "vit_tokens_per_layer", _vit_hint(arch))
                for t in crop_vit_tokens]
    vit_tokens = per_crop[0]
    visual = _check_counts(llm_visual_per_layer, arch.llm_layers, "llm_visual_per_layer", "one per decoder layer")
    llm_tokens = [v + text_tokens for v in visual]

    vit = sum(vit_flops(arch, t) for t in per_crop) / TERA
    llm = llm_flops(arch, llm_tokens) / TERA
    return {
        "vit": vit,
        "llm": llm,
        "extra": float(extra),
        "total": vit + llm + float(extra),
        "vit_tokens": vit_tokens,
        "crops": crops,
        "llm_tokens": llm_tokens,
        "llm_equivalent_visual_tokens": sum(visual) / len(visual),
    }


# ---------------------------------------------------------------------------------------------- schedules


def per_layer_counts(
    start: int, keeps: Sequence[int], group_size: int, layers: int, prune_before: bool = False
) -> list[int]:
    """Expand a pruning schedule, one budget per group of layers, into one token count per layer.

    The layers form consecutive groups of `group_size`, and the last group may be shorter. keeps[g] is the count
    left by group g's pruning step. With prune_before=False, the step runs at the group's top layer (the
    package's GTP, DESIGN section 4), so group g runs at the count group g-1 left, and group 0 runs at `start`.
    With prune_before=True, the step runs before the group's first layer, so group g already runs at keeps[g].
    Layers after the last group run at keeps[-1].
    Counts here are whatever the caller prices: add 1 for the ViT's [CLS], or the text tokens for the LLM.
    Returns a list of `layers` ints.
    """
    _check_count(start, "start")
    _check_positive(group_size, "group_size")
    _check_positive(layers, "layers")
    n_groups = math.ceil(layers / group_size)
    keeps = _check_counts(keeps, None, "keeps", "one per group")
    if not 1 <= len(keeps) <= n_groups:
        raise ValueError(
            f"keeps has {len(keeps)} entries, but {layers} layers in groups of {group_size} "
            f"have room for 1..{n_groups} pruning steps"
        )
    before = [start, *keeps[:-1]]
    if any(k > b for k, b in zip(keeps, before)):
        raise ValueError(f"a pruning schedule cannot add tokens: start {start}, keeps {keeps}")
    counts: list[int] = []
    for g, (k, b) in enumerate(zip(keeps, before)):
        size = min(group_size, layers - g * group_size)
        counts += [k if prune_before else b] * size
    return counts + [keeps[-1]] * (layers - len(counts))


# ---------------------------------------------------------------------------------------------- extra column


@dataclass(frozen=True)
class TextEncoder:
    """A CLIP text tower's dimensions: width, MLP width, layers, heads, context length and joint-space width."""

    hidden: int = 768
    intermediate: int = 3072
    layers: int = 12
    heads: int = 12
    context: int = 77
    embed_dim: int = 768

    @classmethod
    def clip_vit_l14(cls) -> "TextEncoder":
        """The text tower of CLIP ViT-L/14 (and ViT-L/14-336), the one IVTP's aligner uses."""
        return cls()


def extra_flops_clip_text(encoder: TextEncoder, tokens: int, truncate: bool = True) -> int:
    """FLOPs of running the CLIP text tower on an instruction of `tokens` CLIP tokens, for IVTP's relevance.

    The tower always runs at its full context (open_clip pads to 77), so the cost depends on how many windows
    run, not on `tokens` itself. With truncate=True (what ivtp/aligner.py does), one window runs and tokens past
    the context are dropped. With truncate=False, the text is split into ceil(tokens / (context - 2)) windows,
    because each window spends 2 positions on start and end markers. Every position is also projected into the
    joint space (ln_final, then text_projection), because the aligner needs a relevance for each token.
    Returns FLOPs (int), or 0 for an empty instruction: the aligner is skipped then.
    """
    _check_count(tokens, "tokens")
    if tokens == 0:
        return 0
    windows = 1 if truncate else math.ceil(tokens / (encoder.context - 2))
    n, d, f = encoder.context, encoder.hidden, encoder.intermediate
    tower_macs = encoder.layers * (n * (4 * d * d + 2 * d * f) + 2 * n * n * d)
    projection_macs = n * d * encoder.embed_dim
    return 2 * windows * (tower_macs + projection_macs)


def extra_flops_rollout(hidden: int, tokens_per_layer: Sequence[int], group_size: int) -> int:
    """FLOPs of GTP scoring over the layers where it runs, as this package computes it (DESIGN sections 4-5).

    tokens_per_layer: the tokens each scored layer runs its scores on. In the ViT that is the layer's tokens. In
    the LLM it is the visual tokens plus the one pseudo-CLS query. Layers form groups of `group_size`, and the
    last group may be shorter.
    Every layer below a group's top needs the full head-mean attention matrix again, because SDPA does not return
    it: QK^T costs n^2 * hidden MACs, and carrying the rollout row through it costs n^2 more. The top layer needs
    only the query row (n * hidden MACs) and the value norms (n * hidden MACs).
    Softmax and head-averaging are elementwise work, so they are left out, as everywhere in this convention.
    Returns FLOPs (int).
    """
    _check_positive(hidden, "hidden")
    _check_positive(group_size, "group_size")
    counts = _check_counts(tokens_per_layer, None, "tokens_per_layer", "one per scored layer")
    macs = 0
    for i, n in enumerate(counts):
        is_top = (i + 1) % group_size == 0 or i == len(counts) - 1
        macs += 2 * n * hidden if is_top else n * n * hidden + n * n
    return 2 * macs


# ---------------------------------------------------------------------------------------------- trained compressors


def compressor_flops(arch: Arch, name: str, num_tokens: int = 64, instruction_tokens: int = 0, **options) -> dict:
    """FLOPs of a trained compressor in place of LLaVA's projector (ivtp/projectors), at its defaults unless
    `options` give the module's own keywords. Returns {'compressor': int, 'readout': int, 'tokens_per_image': int}.

    'readout' is the MLP that maps the compressed tokens to the LLM width (LLaVA's projector on them, or
    Honeybee's SiLU MLP); the convention leaves LLaVA's projector out, so 'compressor' alone is the paper's extra
    column (Table 9: Qwen-VL 0.003 TFLOPs at 7B). Counted as everywhere here: matmuls and convolutions (the
    depthwise 3x3 at 9 MACs per channel and position), not norms, activations, pooling or softmax.
    instruction_tokens: the instruction's tokens, which LLaMA-VID's Q-Former reads (at most its max_text, 256).
    """
    pricers = {"honeybee": _honeybee_macs, "llama_vid": _llama_vid_macs, "qwen_vl": _qwen_vl_macs}
    if name not in pricers:
        raise ValueError(f"unknown projector {name!r}; choose one of {', '.join(pricers)}")
    side = _check_positive(math.isqrt(_check_positive(num_tokens, "num_tokens")), "num_tokens")
    if side * side != num_tokens:
        raise ValueError(f"num_tokens must be a square number (a grid), got {num_tokens}")
    _check_count(instruction_tokens, "instruction_tokens")
    compressor, readout, tokens = pricers[name](arch, num_tokens, instruction_tokens, **options)
    return {"compressor": 2 * compressor, "readout": 2 * readout, "tokens_per_image": tokens}


def _honeybee_macs(arch: Arch, k: int, _instruction: int, hidden: int | None = None, depth: int = 3,
                   mlp_depth: int = 2) -> tuple[int, int, int]:
    """Two RegNet stages (the first on the patches, the second on the pooled grid) and the SiLU MLP readout."""
    d, h, n = arch.vision_hidden, hidden or arch.vision_hidden, arch.num_patches

    def block(tokens: int, c_in: int, c: int) -> int:
        reduced = max(1, round(c_in * 0.25))
        shortcut = tokens * c_in * c if c_in != c else 0
        return tokens * c_in * c + tokens * c * 9 + 2 * c * reduced + tokens * c * c + shortcut

    stages = sum(block(n, d if i == 0 else h, h) + block(k, h, h) for i in range(depth))
    return stages, k * (h * arch.llm_hidden + (mlp_depth - 1) * arch.llm_hidden ** 2), k


def _qwen_vl_macs(arch: Arch, k: int, _instruction: int, width: int | None = None,
                  heads: int | None = None) -> tuple[int, int, int]:
    """kv_proj (when the width differs from the tower's), q/k/v/out projections, QK^T and AV, Qwen-VL's square
    output projection; then LLaVA's projector on the k tokens."""
    d, n, w = arch.vision_hidden, arch.num_patches, width or arch.vision_hidden
    kv_proj = n * d * w if w != d else 0
    attention = k * w * w + 2 * n * w * w + 2 * k * n * w + k * w * w
    return kv_proj + attention + k * w * w, k * (w * arch.llm_hidden + arch.llm_hidden ** 2), k


def _llama_vid_macs(arch: Arch, k: int, instruction: int, width: int | None = None, layers: int = 12,
                    heads: int | None = None, num_queries: int = 32, cross_every: int = 2,
                    max_text: int = 256, text_hidden: int | None = None) -> tuple[int, int, int]:
    """The Q-Former (text in-projection; per layer self-attention over queries and text, the queries'
    cross-attention to the patches every cross_every-th layer, the two feed-forwards), the context attention
    (query, key and value maps, QK^T, AV), then LLaVA's projector on the k content tokens."""
    d, n, dl = arch.vision_hidden, arch.num_patches, arch.llm_hidden
    w, q, t = width or min(768, d), num_queries, min(instruction, max_text)
    s = q + t
    qformer = t * (text_hidden or dl) * w
    for i in range(layers):
        qformer += 4 * s * w * w + 2 * s * s * w + 8 * s * w * w
        if i % cross_every == 0:
            qformer += 2 * q * w * w + 2 * n * d * w + 2 * q * n * w
    context = q * w * d + n * d * d + 2 * q * n * d + d * dl
    return qformer + context, k * (d * dl + dl * dl), k + 1


def compressor_llava_flops(arch: Arch, name: str, text_tokens: int, num_tokens: int = 64, **options) -> dict:
    """llava_flops for LLaVA-1.5 with a compressor in place of its projector: the whole ViT, the LLM on the
    compressor's tokens (LLaMA-VID: num_tokens + its context token) and `text_tokens`, the compressor in 'extra'.
    The instruction LLaMA-VID's Q-Former reads is taken to be the text tokens (capped at its max_text)."""
    priced = compressor_flops(arch, name, num_tokens, instruction_tokens=text_tokens, **options)
    out = llava_flops(arch, text_tokens, llm_visual_per_layer=[priced["tokens_per_image"]] * arch.llm_layers,
                      extra=priced["compressor"] / TERA)
    return {**out, "readout": priced["readout"] / TERA, "final_visual_tokens": priced["tokens_per_image"]}


# ---------------------------------------------------------------------------------------------- validation


def _vit_hint(arch: Arch) -> str:
    return f"one per CLIP layer up to vision_feature_layer {arch.vision_feature_layer}"


def _is_int(value) -> bool:
    # numpy and torch integer scalars count as ints; bools do not, even though bool subclasses int.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_positive(value, what: str) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _check_count(value, what: str) -> int:
    if not _is_int(value):
        raise ValueError(f"{what} must be an int token count, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def _check_counts(values, expected: int | None, what: str, hint: str) -> list[int]:
    """Validate a per-layer collection of token counts and return it as a new list of ints.

    expected=None accepts any non-zero length.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{what} must be a list of token counts ({hint}), got {type(values).__name__}")
    counts = list(values)
    if expected is not None and len(counts) != expected:
        raise ValueError(f"{what} has {len(counts)} entries, expected {expected} ({hint})")
    if not counts:
        raise ValueError(f"{what} is empty ({hint})")
    for i, n in enumerate(counts):
        if not _is_int(n):
            raise ValueError(f"{what}[{i}] must be an int token count, got {n!r}")
        if n < 0:
            raise ValueError(f"{what}[{i}] is {n}: a token count cannot be negative")
    return [int(n) for n in counts]
