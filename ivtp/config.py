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

Budget = Union[int, float]

CONFIG_NAME = "ivtp_config.json"
METHODS = ("ivtp",)  # the peer methods register here as they land


class ConfigError(ValueError):
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


@dataclass
class VisionStage:
    """Stage 1: Group-wise Token Pruning inside the CLIP ViT (paper section 3.2)."""

    enabled: bool = True
    # Layers per rollout group; pruning happens at each group's top layer (paper: 3).
    group_size: int = 3
    # Tokens handed to the projector (a count or a ratio of the patches).
    keep: Budget = 64
    # "linear": counts fall linearly from the patch count to `keep` over the groups. Or an explicit list of
    # budgets, one per group, non-increasing, whose last entry equals `keep`.
    schedule: Union[str, list] = "linear"

    def validate(self, prefix: str = "vision") -> None:
        _check_bool(self.enabled, f"{prefix}.enabled")
        _check_int(self.group_size, f"{prefix}.group_size", 1)
        check_budget(self.keep, f"{prefix}.keep")
        if isinstance(self.schedule, str):
            if self.schedule != "linear":
                raise ConfigError(f"{prefix}.schedule: expected 'linear' or a list of budgets, got {self.schedule!r}")
            return
        if not isinstance(self.schedule, (list, tuple)) or not self.schedule:
            raise ConfigError(f"{prefix}.schedule: expected 'linear' or a non-empty list, got {self.schedule!r}")
        for i, b in enumerate(self.schedule):
            check_budget(b, f"{prefix}.schedule[{i}]")
        # Lists of plain counts can be checked now; ratios need the token count and are checked at apply time.
        if all(isinstance(b, int) for b in self.schedule):
            check_schedule_counts(list(self.schedule), None, f"{prefix}.schedule")
            if isinstance(self.keep, int) and self.schedule[-1] != self.keep:
                raise ConfigError(
                    f"{prefix}.schedule: the last entry ({self.schedule[-1]}) must equal {prefix}.keep ({self.keep})"
                )


@dataclass
class LLMStage:
    """Stage 2: instruction-guided GTP inside the first LLM layers (paper sections 3.3-3.4).

    The keys are reserved with the paper's values; the stage itself lands with the stage-2 issue, and enabling
    it before then is an error rather than a silent no-op.
    """

    enabled: bool = False
    layers: int = 12
    group_size: int = 3
    keep: Budget = 64
    tau: float = 0.2

    def validate(self, prefix: str = "llm") -> None:
        _check_bool(self.enabled, f"{prefix}.enabled")
        _check_int(self.layers, f"{prefix}.layers", 1)
        _check_int(self.group_size, f"{prefix}.group_size", 1)
        check_budget(self.keep, f"{prefix}.keep")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not (-1.0 <= self.tau <= 1.0):
            raise ConfigError(f"{prefix}.tau: a cosine threshold in [-1, 1] is expected, got {self.tau!r}")
        if self.enabled:
            raise ConfigError(
                f"{prefix}.enabled: the in-LLM stage (stage 2) is not implemented in this release; set it to false"
            )


def check_schedule_counts(counts: list[int], available: int | None, key: str) -> None:
    """A schedule of token counts must be non-increasing and fit in the tokens available."""
    prev = available
    for i, c in enumerate(counts):
        if prev is not None and c > prev:
            what = f"the {available} tokens available" if i == 0 else f"the previous step ({prev})"
            raise ConfigError(f"{key}[{i}]: {c} tokens is more than {what}; a schedule cannot grow")
        prev = c


@dataclass
class PruneConfig:
    """Everything that defines a pruning run. Saved next to the weights as ``ivtp_config.json``."""

    method: str = "ivtp"
    vision: VisionStage = field(default_factory=VisionStage)
    llm: LLMStage = field(default_factory=LLMStage)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown method {self.method!r}; known methods: {', '.join(METHODS)}")
        if not isinstance(self.vision, VisionStage) or not isinstance(self.llm, LLMStage):
            raise ConfigError("vision and llm must be VisionStage and LLMStage (use PruneConfig.from_dict)")
        self.vision.validate()
        self.llm.validate()

    # ---- (de)serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict | None) -> "PruneConfig":
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ConfigError(f"a prune config is a mapping, got {type(d).__name__}")
        stages = {"vision": VisionStage, "llm": LLMStage}
        _reject_unknown(d, {f.name for f in dataclasses.fields(cls)}, "")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in stages:
                if value is None:
                    value = {}
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: expected a mapping, got {value!r}")
                stage_cls = stages[key]
                _reject_unknown(value, {f.name for f in dataclasses.fields(stage_cls)}, f"{key}.")
                kwargs[key] = stage_cls(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "PruneConfig":
        import yaml

        if not os.path.isfile(path):
            raise FileNotFoundError(f"prune config not found: {path}")
        with open(path) as f:
            data = yaml.safe_load(f)
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
        path = os.path.join(directory, CONFIG_NAME)
        with open(path) as f:
            return cls.from_dict(json.load(f))

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
            with open(source) as f:
                return cls.from_dict(json.load(f))
        return cls.from_yaml(source)


def _reject_unknown(d: dict, known: set[str], prefix: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)}; "
            f"known keys here: {', '.join(sorted(prefix + k for k in known))}"
        )
