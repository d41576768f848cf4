"""Every pruning method behind one interface: a config section, a runner before the LLM, and optionally an
in-LLM stage. `ivtp.apply_pruning` picks them by `PruneConfig.method`.

A method registers a builder: `build(config, tower_config, num_patches) -> VisionRunner`. The runner turns pixel
values into the visual tokens each image hands the LLM (always the same count per image, so the placeholders
shrink uniformly).
"""

from __future__ import annotations

from typing import Callable

from ivtp.methods.base import VisionRunner

_BUILDERS: dict[str, Callable] = {}


def register(name: str):
    def wrap(builder):
        if name in _BUILDERS:
            raise ValueError(f"method {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return wrap


def build_vision_runner(config, tower_config, feature_layer: int) -> VisionRunner:
    from ivtp.methods import ivtp, peers  # noqa: F401  (importing them registers their runners)

    name = config.base_method
    if name not in _BUILDERS:
        raise KeyError(f"no runner registered for method {name!r}")
    return _BUILDERS[name](config, tower_config, feature_layer)


__all__ = ["register", "build_vision_runner", "VisionRunner"]
