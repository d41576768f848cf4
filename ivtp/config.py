"""PruneConfig: the one place where pruning defaults live.

A YAML file maps onto these dataclasses one-to-one. Unknown keys and impossible values are rejected when the
config is built, with the dotted name of the offending key, so a typo in an ablation YAML fails before a model is
loaded rather than silently falling back to a default.

Budgets: an ``int`` is a token count; a ``float`` in (0, 1] is a ratio of the tokens available at that point
(1.0 keeps all). The same YAML therefore serves LLaVA-1.5 (576 patches) and the tiny test models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Union

from ivtp.errors import InputError

Budget = Union[int, float]

CONFIG_NAME = "ivtp_config.json"
# Peer methods that prune before the LLM (in the ViT or on its output), each with a section of its own below.
VISION_PEERS = ("random", "topk", "spatial", "evit", "tome", "fastervlm", "vispruner")
# "+" variants (IVTP Table 7): a visual-only method followed by IVTP's in-LLM stage (the `llm` section).
PLUS_VARIANTS = ("topk+", "tome+")
METHODS = ("ivtp", *VISION_PEERS, "fastv", "visiondrop", "sparsevlm", *PLUS_VARIANTS)
# How the attention rows of a group's layers become one score row (IVTP Tables 4-5):
#   rollout       eq. 3, the residual rollout over the group (the method)
#   mean/max/multiply  elementwise mean / max / product of each layer's query row
#   single_layer  the top layer's query row alone ("group-wise" in Table 4)
#   layer_wise    prune at every layer from its own row (the group size is then 1)
AGGREGATIONS = ("rollout", "mean", "max", "multiply", "single_layer", "layer_wise")
# What the in-LLM pseudo-CLS is built from (IVTP Table 6):
#   none           the visual [CLS] through the projector, always
#   all_text       the mean of every instruction token
#   llm_threshold  instruction tokens whose LLM-embedding cosine to the projected [CLS] reaches tau
#   clip           instruction tokens whose CLIP-text relevance to the image reaches tau (the method)
#   random         a control, not a method: a seeded random pseudo-CLS at the fallback's norm. A scorer whose
#                  kept set does not change with it reads no instruction (docs/paper.md, "Extensions")
GUIDANCES = ("none", "all_text", "llm_threshold", "clip", "random")
ANYRES_LAYOUTS = ("auto", "survivors", "stock")
ANYRES_BUDGETS = ("per_crop", "per_image")
# How eq. 6's cosines are read before the tau threshold (our extension; the paper thresholds the raw cosine):
#   cosine        the raw cosine (the paper)
#   centred       minus the mean over the row's rated instruction tokens: the aligner's offset per image (its
#                 mean relevance varies across images five times more than within one) no longer decides
#                 between "no token passes" and "every token passes"
#   standardised  centred, then divided by the row's standard deviation: tau in standard deviations
RELEVANCES = ("cosine", "centred", "standardised")
# Which instruction tokens are rated (our extension; the paper rates every token after the image):
#   all       every instruction token, the chat template's and the answer-format suffix's included (the paper)
#   question  the user's question only: `template_phrases` (role tags, answer-format suffixes) are not rated
INSTRUCTION_SCOPES = ("all", "question")
# LLaVA-1.5's answer-format suffixes (its eval scripts) and the vicuna_v1 assistant tag: text of the prompt that
# no question's meaning depends on.
TEMPLATE_PHRASES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer yes or no.",
    "When the provided information is insufficient, respond with 'Unanswerable'.",
    "Reference OCR token:",
    "ASSISTANT:",
)


class ConfigError(InputError):
    """A prune config key is unknown or holds an impossible value."""


def check_budget(value: Any, key: str) -> Budget:
    """Validate one budget value; ``key`` is the dotted name used in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: a budget is an int (token count) or a float in (0, 1] (ratio), got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"{key}: a token count must be >= 1, got {value}")
    if isinstance(value, float) and not (0.0 < value <= 1.0):
        raise ConfigError(f"{key}: a ratio must lie in (0, 1], got {value}")
    return value


def resolve_budget(value: Budget, available: int, key: str) -> int:
    """Turn a budget into a token count out of ``available`` tokens.

    A ratio rounds to the nearest count and never below 1; a count above ``available`` is an error, because the
    user asked for tokens that do not exist.
    """
    check_budget(value, key)
    if isinstance(value, float):
        return max(1, min(available, int(math.floor(value * available + 0.5))))
    if value > available:
        raise ConfigError(f"{key}: budget {value} is larger than the {available} tokens available")
    return value


def _check_int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected an int >= {minimum}, got {value!r}")
    return value


def _check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


class _GroupedStage:
    """What both stages share: the group size that aggregation actually uses."""

    aggregation: str
    group_size: int

    @property
    def effective_group_size(self) -> int:
        return 1 if self.aggregation == "layer_wise" else self.group_size


@dataclass
class VisionStage(_GroupedStage):
    """Stage 1: Group-wise Token Pruning inside the CLIP ViT (paper section 3.2)."""

    enabled: bool = True
    # Layers per rollout group; pruning happens at each group's top layer (paper: 3).
    group_size: int = 3
    # Tokens handed to the projector (a count or a ratio of the patches). The paper gives only the final 64;
    # 128 here puts stage 2's extra FLOPs where Table 9 has them (docs/paper.md).
    keep: Budget = 128
    # "linear": counts fall linearly from the patch count to `keep` over the groups. Or an explicit list of
    # budgets, one per group, non-increasing, whose last entry equals `keep`.
    schedule: Union[str, list] = "linear"
    aggregation: str = "rollout"

    def validate(self, prefix: str = "vision") -> None:
        _check_bool(self.enabled, f"{prefix}.enabled")
        _check_int(self.group_size, f"{prefix}.group_size", 1)
        check_budget(self.keep, f"{prefix}.keep")
        _check_choice(self.aggregation, AGGREGATIONS, f"{prefix}.aggregation")
        _check_schedule(self.schedule, self.keep, prefix)


def _check_choice(value: Any, choices: tuple, key: str) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _check_schedule(schedule: Any, keep: Budget, prefix: str) -> None:
    """'linear' or a non-empty list of budgets; lists of counts are checked against `keep` now."""
    if isinstance(schedule, str):
        if schedule != "linear":
            raise ConfigError(f"{prefix}.schedule: expected 'linear' or a list of budgets, got {schedule!r}")
        return
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ConfigError(f"{prefix}.schedule: expected 'linear' or a non-empty list, got {schedule!r}")
    for i, b in enumerate(schedule):
        check_budget(b, f"{prefix}.schedule[{i}]")
    # Lists of plain counts can be checked now; ratios need the token count and are checked at apply time.
    if all(isinstance(b, int) for b in schedule):
        check_schedule_counts(list(schedule), None, f"{prefix}.schedule")
        if isinstance(keep, int) and schedule[-1] != keep:
            raise ConfigError(
                f"{prefix}.schedule: the last entry ({schedule[-1]}) must equal {prefix}.keep ({keep})"
            )


@dataclass
class AlignerConfig:
    """The CLIP text tower that rates instruction tokens (open_clip names). It must match the vision tower:
    ViT-L-14-336 with OpenAI weights for LLaVA-1.5. `pretrained: null` builds random weights (tests only)."""

    model: str = "ViT-L-14-336"
    pretrained: Union[str, None] = "openai"  # an open_clip tag, a local checkpoint file, or null

    def validate(self, prefix: str = "llm.aligner") -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"{prefix}.model: an open_clip model name is expected, got {self.model!r}")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ConfigError(f"{prefix}.pretrained: a tag, a file path or null, got {self.pretrained!r}")


@dataclass
class LLMStage(_GroupedStage):
    """Stage 2: instruction-guided GTP inside the first LLM layers (paper sections 3.3-3.4)."""

    enabled: bool = True
    # Pruning happens within the first `layers` decoder layers (paper: 12), in groups of `group_size`.
    layers: int = 12
    group_size: int = 3
    # Visual tokens per image left after the last group (a count, or a ratio of what stage 1 hands on).
    keep: Budget = 64
    # "linear" from stage 1's output to `keep`, or one budget per group.
    schedule: Union[str, list] = "linear"
    # CLIP-text relevance threshold for instruction tokens (eq. 8), in the units `relevance` gives.
    tau: float = 0.2
    aggregation: str = "rollout"
    guidance: str = "clip"
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    # Extensions (docs/paper.md); the defaults are the paper's form.
    relevance: str = "cosine"
    instruction: str = "all"
    template_phrases: list = field(default_factory=lambda: list(TEMPLATE_PHRASES))  # with instruction: question

    def validate(self, prefix: str = "llm") -> None:
        _check_bool(self.enabled, f"{prefix}.enabled")
        _check_int(self.layers, f"{prefix}.layers", 1)
        _check_int(self.group_size, f"{prefix}.group_size", 1)
        check_budget(self.keep, f"{prefix}.keep")
        _check_schedule(self.schedule, self.keep, prefix)
        _check_choice(self.relevance, RELEVANCES, f"{prefix}.relevance")
        # A cosine (raw or centred) lies in [-1, 1] (centred: [-2, 2]); standardised relevance is in deviations.
        bound = {"cosine": 1.0, "centred": 2.0, "standardised": 10.0}[self.relevance]
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not (-bound <= self.tau <= bound):
            raise ConfigError(f"{prefix}.tau: with relevance {self.relevance!r} a threshold in [-{bound:g}, "
                              f"{bound:g}] is expected, got {self.tau!r}")
        _check_choice(self.aggregation, AGGREGATIONS, f"{prefix}.aggregation")
        _check_choice(self.guidance, GUIDANCES, f"{prefix}.guidance")
        _check_choice(self.instruction, INSTRUCTION_SCOPES, f"{prefix}.instruction")
        if (self.relevance != "cosine" or self.instruction != "all") and self.guidance != "clip":
            raise ConfigError(f"{prefix}.relevance and {prefix}.instruction shape the CLIP relevance: they need "
                              f"{prefix}.guidance 'clip', not {self.guidance!r}")
        if (not isinstance(self.template_phrases, (list, tuple))
                or not all(isinstance(p, str) and p.strip() for p in self.template_phrases)):
            raise ConfigError(f"{prefix}.template_phrases: a list of non-empty strings, got {self.template_phrases!r}")
        if not isinstance(self.aligner, AlignerConfig):
            raise ConfigError(f"{prefix}.aligner: expected a mapping with model and pretrained")
        self.aligner.validate(f"{prefix}.aligner")

    @property
    def anyres_layout(self) -> str:
        """LLaVA-NeXT's layout of a pruned image: `anyres.layout`, with auto resolved to the method's authors'."""
        if self.anyres.layout != "auto":
            return self.anyres.layout
        return "stock" if self.base_method == "vispruner" else "survivors"

    @property
    def needs_aligner(self) -> bool:
        return self.enabled and self.guidance == "clip"


def check_schedule_counts(counts: list[int], available: int | None, key: str) -> None:
    """A schedule of token counts must be non-increasing and fit in the tokens available."""
    prev = available
    for i, c in enumerate(counts):
        if prev is not None and c > prev:
            what = f"the {available} tokens available" if i == 0 else f"the previous step ({prev})"
            raise ConfigError(f"{key}[{i}]: {c} tokens is more than {what}; a schedule cannot grow")
        prev = c


@dataclass
class KeepSection:
    """A method whose only knob is how many visual tokens per image reach the LLM."""

    keep: Budget = 64

    def validate(self, prefix: str) -> None:
        check_budget(self.keep, f"{prefix}.keep")


@dataclass
class RandomSection(KeepSection):
    seed: int = 0  # the same seed keeps the same patches, run to run

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check_int(self.seed, f"{prefix}.seed", 0)


EVIT_FUSIONS = ("sum", "mean")
VISIONDROP_POSITIONS = ("renumber", "keep")  # also SparseVLM's positions
TOME_ORDERS = ("tome", "spatial")  # ivtp.ops.merge.bipartite_soft_matching's orders


@dataclass
class ToMeSection(KeepSection):
    """ToMe (Bolya et al. 2023) in the feature layers, merging between attention and MLP. `order` 'tome' returns
    each step's survivors as ToMe's code does (unmerged a-tokens, then b-tokens), which sets the next step's
    split; 'spatial' (ours) keeps them in position order (docs/methods.md)."""

    order: str = "tome"

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check_choice(self.order, TOME_ORDERS, f"{prefix}.order")


@dataclass
class EViTSection(KeepSection):
    """EViT (Liang et al. 2022): keep `keep - 1` patches by [CLS] attention and fuse the rest into one token.
    `fuse` 'sum' is EViT's: the dropped tokens summed with their [CLS] attention as weights. 'mean' (ours) divides
    by the weights' sum, giving a token on the scale of the others (docs/methods.md)."""

    fuse: str = "sum"

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check_choice(self.fuse, EVIT_FUSIONS, f"{prefix}.fuse")


@dataclass
class FastVSection:
    """FastV (Chen et al. 2024) with its K = `layer` and R = `ratio`, as its code runs: layers 0..K-1 see every
    visual token; the last prompt token's attention at layer K-1 (softmax over its whole causal row, head mean)
    ranks them, and layers K on keep round((1 - R) N) of them. `keep` (a count or a ratio), when set, replaces
    `ratio` for budget-matched comparisons."""

    layer: int = 2
    ratio: float = 0.5
    keep: Union[Budget, None] = None

    def validate(self, prefix: str) -> None:
        _check_int(self.layer, f"{prefix}.layer", 1)  # K = 0 would leave no layer to score with
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ConfigError(f"{prefix}.ratio: the share of visual tokens dropped, in [0, 1), got {self.ratio!r}")
        if self.keep is not None:
            check_budget(self.keep, f"{prefix}.keep")


@dataclass
class VisPrunerSection:
    """VisPruner (Zhang et al., ICCV 2025): `visual_token_num` tokens, `important_ratio` of them by [CLS]
    attention, the rest the most diverse of the remainder."""

    visual_token_num: Budget = 64
    important_ratio: float = 0.5

    def validate(self, prefix: str) -> None:
        check_budget(self.visual_token_num, f"{prefix}.visual_token_num")
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ConfigError(f"{prefix}.important_ratio: a share in (0, 1], got {r!r}")


@dataclass
class AnyResSection:
    """LLaVA-NeXT only (docs/paper.md, "LLaVA-NeXT"): how the kept tokens of an image's crops reach the LLM, once a
    method has pruned each crop before it.

    - survivors: each crop's kept tokens, the base view's first, then the tiles' in the raster order of the whole
      tile map; no padding cut, no newlines. Every image hands on `per crop x crops` tokens, a count known before
      any compute (FasterVLM's and VisionZip's NeXT code).
    - stock: the stock layout with only the kept patches in it: the base view's in patch order, then the tile map
      cut to the image (kept patches in the letterbox vanish), with every row's image_newline. The count varies
      with the picks, so the tower runs before the prompt is shrunk (VisPruner's NeXT code).
    - auto: the authors' own (stock for vispruner, survivors for every other method).

    `budget` says what the method's counts are for. per_crop (VisPruner's "32 x 5"): each crop keeps the count,
    so an image of 5 crops hands on 5 times what one of 3 crops does. per_image: the count is the whole image's.
    Stage 1's count is split over the image's crops as evenly as counts allow (`anyres.split_budget`), and a stage
    in the LLM keeps its count per image. Only counts are read that way: a share of the tokens is the same per
    crop and per image, so per_image refuses one."""

    layout: str = "auto"
    budget: str = "per_crop"

    def validate(self, prefix: str) -> None:
        _check_choice(self.layout, ANYRES_LAYOUTS, f"{prefix}.layout")
        _check_choice(self.budget, ANYRES_BUDGETS, f"{prefix}.budget")


@dataclass
class VisionDropSection:
    """VisionDrop (Xu et al.): at CLIP layer -2, `dominant` tokens by [CLS] attention plus `contextual` tokens
    merged from the rest by key similarity; then, at the input of each LLM layer in `llm`, the same with
    visual-to-visual attention: [layer, dominant, contextual] per stage (48 -> 35 -> 26 -> 19 by default).
    `cls` true (its authors' code): [CLS] is one of the encoder's dominant tokens, so `dominant - 1` patches join
    it and the LLM reads the [CLS] feature first. false (ours): `dominant` patches, no [CLS].
    `positions` 'renumber' (its authors' code): an LLM stage rebuilds the sequence from the survivors, contextual
    tokens after the dominant ones, numbered 0, 1, ... again. 'keep' (ours): survivors keep their positions and a
    contextual token takes its target's."""

    dominant: int = 42
    contextual: int = 6
    llm: list = field(default_factory=lambda: [[8, 30, 5], [16, 22, 4], [24, 16, 3]])
    cls: bool = True
    positions: str = "renumber"

    def validate(self, prefix: str) -> None:
        _check_bool(self.cls, f"{prefix}.cls")
        _check_choice(self.positions, VISIONDROP_POSITIONS, f"{prefix}.positions")
        _check_int(self.dominant, f"{prefix}.dominant", 1 if self.cls else 0)  # with cls, [CLS] is one of them
        _check_int(self.contextual, f"{prefix}.contextual", 0)
        if self.dominant + self.contextual < 1:
            raise ConfigError(f"{prefix}: dominant + contextual must be at least 1")
        if not isinstance(self.llm, (list, tuple)):
            raise ConfigError(f"{prefix}.llm: a list of [layer, dominant, contextual], got {self.llm!r}")
        prev_layer, prev_total = 0, self.dominant + self.contextual
        for i, stage in enumerate(self.llm):
            key = f"{prefix}.llm[{i}]"
            if not isinstance(stage, (list, tuple)) or len(stage) != 3:
                raise ConfigError(f"{key}: expected [layer, dominant, contextual], got {stage!r}")
            layer, dom, ctx = (_check_int(v, key, 0) for v in stage)
            if layer <= prev_layer or dom + ctx < 1 or dom + ctx > prev_total:
                raise ConfigError(f"{key}: layers must increase (after {prev_layer}) and the token count "
                                  f"({dom} + {ctx}) must be in [1, {prev_total}]")
            prev_layer, prev_total = layer, dom + ctx


@dataclass
class SparseVLMSection:
    """SparseVLM (Zhang et al., ICML 2025), v1.5: text raters from the input embeddings; at LLM layers 2, 6 and 15
    the raters' attention ranks the visual tokens, the best are kept and the deleted ones partly recycled into
    cluster means. `budget` is its layer-averaged token budget (64, 96, 128 or 192), which fixes its schedule.
    `positions` 'renumber' (its v1.5 code): a stage rebuilds the sequence, [prefix, kept image tokens, recycled
    tokens, text], numbered 0, 1, ... again. 'keep' (its v2.0, and ours before): survivors keep their positions and
    a recycled token takes its cluster centre's."""

    budget: int = 64
    recycle: bool = True
    positions: str = "renumber"

    def validate(self, prefix: str) -> None:
        _check_choice(self.positions, VISIONDROP_POSITIONS, f"{prefix}.positions")
        if self.budget not in (64, 96, 128, 192):
            raise ConfigError(f"{prefix}.budget: SparseVLM defines schedules for 64, 96, 128 and 192 tokens, "
                              f"got {self.budget!r}")
        _check_bool(self.recycle, f"{prefix}.recycle")


@dataclass
class PruneConfig:
    """Everything that defines a pruning run. Saved next to the weights as ``ivtp_config.json``.

    `method` picks the method; `vision` and `llm` are IVTP's two stages (`llm` also serves the "+" variants);
    every peer method reads its own section, named after it.
    """

    method: str = "ivtp"
    vision: VisionStage = field(default_factory=VisionStage)
    llm: LLMStage = field(default_factory=LLMStage)
    random: RandomSection = field(default_factory=RandomSection)
    topk: KeepSection = field(default_factory=KeepSection)
    spatial: KeepSection = field(default_factory=KeepSection)
    evit: EViTSection = field(default_factory=EViTSection)
    tome: ToMeSection = field(default_factory=ToMeSection)
    fastervlm: KeepSection = field(default_factory=KeepSection)
    vispruner: VisPrunerSection = field(default_factory=VisPrunerSection)
    fastv: FastVSection = field(default_factory=FastVSection)
    visiondrop: VisionDropSection = field(default_factory=VisionDropSection)
    sparsevlm: SparseVLMSection = field(default_factory=SparseVLMSection)
    anyres: AnyResSection = field(default_factory=AnyResSection)  # LLaVA-NeXT's layout; any method may set it

    def __post_init__(self) -> None:
        self.validate()

    @property
    def base_method(self) -> str:
        """The method without its "+": topk+ is topk before the LLM."""
        return self.method.rstrip("+")

    @property
    def uses_llm_stage(self) -> bool:
        """IVTP's in-LLM stage runs for ivtp (when enabled) and the "+" variants."""
        return (self.method == "ivtp" and self.llm.enabled) or self.method in PLUS_VARIANTS

    @property
    def anyres_layout(self) -> str:
        """LLaVA-NeXT's layout of a pruned image: `anyres.layout`, with auto resolved to the method's authors'."""
        if self.anyres.layout != "auto":
            return self.anyres.layout
        return "stock" if self.base_method == "vispruner" else "survivors"

    @property
    def needs_aligner(self) -> bool:
        """Whether the in-LLM stage runs with CLIP-text guidance, and so needs an aligner and the LLM tokenizer."""
        return self.uses_llm_stage and self.llm.needs_aligner

    def stage1_budget(self) -> tuple[str, str] | None:
        """(section, key) of the one count that sets the visual tokens per image stage 1 hands on, None when
        nothing prunes before the LLM. LLaVA-NeXT's `anyres.budget: per_image` splits it over an image's crops;
        a method whose stage 1 has no such single count is refused here, with the reason."""
        if self.method == "ivtp":
            if not self.vision.enabled:
                return None
            if self.vision.schedule != "linear":
                raise ConfigError("anyres.budget per_image: vision.schedule must be 'linear', so that each crop's "
                                  "share of the image's vision.keep sets its own schedule")
            return "vision", "keep"
        if self.base_method in ("fastv", "sparsevlm"):
            return None
        if self.base_method == "visiondrop":
            raise ConfigError("anyres.budget per_image: visiondrop's budgets are dominant + contextual tokens per "
                              "crop at every stage, not one count; use anyres.budget per_crop")
        return self.base_method, "visual_token_num" if self.base_method == "vispruner" else "keep"

    def llm_budgets(self) -> list[tuple[str, Any]]:
        """(key, value) of each budget the method's stage in the LLM reads (a count, or a float share)."""
        if self.uses_llm_stage:
            steps = self.llm.schedule if isinstance(self.llm.schedule, list) else []
            return [("llm.keep", self.llm.keep)] + [(f"llm.schedule[{i}]", v) for i, v in enumerate(steps)]
        if self.method == "fastv":
            return [("fastv.ratio", self.fastv.ratio)] if self.fastv.keep is None else [("fastv.keep", self.fastv.keep)]
        if self.method == "sparsevlm":
            return [("sparsevlm.budget", self.sparsevlm.budget)]
        return []

    def with_stage1_count(self, count: int) -> "PruneConfig":
        """This config with stage 1 handing on `count` tokens per crop (the key stage1_budget names)."""
        section, key = self.stage1_budget()
        d = self.to_dict()
        d[section] = {**d[section], key: count}
        return PruneConfig.from_dict(d)

    def sections(self) -> set[str]:
        """The config sections this method reads."""
        if self.method == "ivtp":
            return {"vision", "llm"}
        return {self.base_method} | ({"llm"} if self.method in PLUS_VARIANTS else set())

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown method {self.method!r}; known methods: {', '.join(METHODS)}")
        for f in dataclasses.fields(self):
            if f.name != "method":
                getattr(self, f.name).validate(f.name)
        if self.method in PLUS_VARIANTS and not self.llm.enabled:
            raise ConfigError(f"llm.enabled: {self.method} is {self.base_method} followed by IVTP's in-LLM stage")

    @classmethod
    def for_method(cls, method: str, visual_tokens: int | None = None) -> "PruneConfig":
        """A method at its paper's defaults, or budget-matched to `visual_tokens` final visual tokens per image.

        Defaults: 64 tokens for the methods with a budget knob, FastV's K = 2 and R = 50%, VisionDrop's
        48 -> 35 -> 26 -> 19. IVTP and the "+" variants hand the LLM stage twice the final count (as IVTP's own
        stage 1 does: 128 for 64), so that stage has something to prune. VisionDrop scales its whole schedule by
        visual_tokens / 64.
        """
        if method not in METHODS:
            raise ConfigError(f"method: unknown method {method!r}; known methods: {', '.join(METHODS)}")
        k = 64 if visual_tokens is None else _check_int(visual_tokens, "visual_tokens", 1)
        base = method.rstrip("+")
        if method == "ivtp":
            d = {"vision": {"keep": 2 * k}, "llm": {"keep": k}}
        elif method in PLUS_VARIANTS:
            d = {base: {"keep": 2 * k}, "llm": {"keep": k}}
        elif method == "vispruner":
            d = {"vispruner": {"visual_token_num": k}}
        elif method == "fastv":
            d = {} if visual_tokens is None else {"fastv": {"keep": k}}
        elif method == "sparsevlm":  # its budgets are layer averages with fixed schedules
            d = {"sparsevlm": {"budget": k}}
        elif method == "visiondrop":
            vd, f = VisionDropSection(), k / 64
            d = {"visiondrop": {"dominant": max(1, round(vd.dominant * f)), "contextual": round(vd.contextual * f),
                                "llm": [[layer, max(1, round(dom * f)), round(ctx * f)] for layer, dom, ctx in vd.llm]}}
        else:
            d = {base: {"keep": k}}
        return cls.from_dict({"method": method, **d})

    # ---- (de)serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict | None) -> "PruneConfig":
        cfg = _build(cls, {} if d is None else d, "")
        stray = sorted(set(d or {}) - {"method", "anyres"} - cfg.sections())
        if stray:
            raise ConfigError(f"{', '.join(stray)}: not read by method {cfg.method!r}, which reads "
                              f"{', '.join(sorted(cfg.sections()))}")
        return cfg

    def to_dict(self) -> dict:
        """The method and the sections it reads (what ivtp_config.json holds)."""
        full = dataclasses.asdict(self)
        out = {"method": self.method, **{k: full[k] for k in sorted(self.sections())}}
        default = dataclasses.asdict(AnyResSection())
        anyres = {k: v for k, v in full["anyres"].items() if v != default[k]}
        if anyres:  # only what is set: LLaVA-1.5 configs stay as they were
            out["anyres"] = anyres
        return out

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "PruneConfig":
        import yaml

        if not os.path.isfile(path):
            raise FileNotFoundError(f"prune config not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                where = getattr(e, "problem_mark", None)
                at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
                raise ConfigError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        return cls._from_file_data(data, path)

    @classmethod
    def _from_file_data(cls, data, path) -> "PruneConfig":
        if data is None:  # an empty file would silently mean the paper's defaults
            raise ConfigError(f"{path} is empty; write the settings to change, or leave --prune-config out for "
                              "the paper's defaults")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PruneConfig":
        return cls._from_json(os.path.join(directory, CONFIG_NAME))

    @classmethod
    def _from_json(cls, path) -> "PruneConfig":
        with open(path) as f:
            text = f.read()
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls._from_file_data(data, path)

    @classmethod
    def load(cls, source: "str | os.PathLike | dict | PruneConfig | None") -> "PruneConfig":
        """Accept what a user has at hand: a config, a dict, a YAML/JSON path, or a checkpoint folder."""
        if source is None:
            return cls()
        if isinstance(source, PruneConfig):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        if os.path.isdir(source):
            return cls.from_pretrained(source)
        if str(source).endswith(".json"):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"prune config not found: {source}")
            return cls._from_json(source)
        return cls.from_yaml(source)


def _build(cls, d: Any, prefix: str):
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields; unknown keys are errors."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(d, set(fields), prefix)
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        f = fields[key]
        nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested):
            kwargs[key] = _build(type(nested), {} if value is None else value, f"{prefix}{key}.")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _reject_unknown(d: dict, known: set[str], prefix: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)}; "
            f"known keys here: {', '.join(sorted(prefix + k for k in known))}"
        )
