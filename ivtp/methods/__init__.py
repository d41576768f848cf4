"""Every pruning method behind one interface: a config section, a runner before the LLM, and optionally an
in-LLM stage. `ivtp.apply_pruning` picks them by `PruneConfig.method`. Each method lives in one module.

A method registers a builder: `build(config, tower_config, num_patches) -> VisionRunner`. The runner turns pixel
values into the visual tokens each image hands the LLM (always the same count per image, so the placeholders
shrink uniformly). A method that prunes inside the LLM also registers `plan(config, num_layers, tokens_in) ->
LLMPlan | None`, whose step (base.LLMStep) the patched decoder runs.
"""

from __future__ import annotations

from typing import Callable

from ivtp.methods.base import VisionRunner

_BUILDERS: dict[str, Callable] = {}
_LLM_PLANS: dict[str, Callable] = {}


def _registrar(table: dict, what: str, name: str):
    def wrap(builder):
        if name in table:
            raise ValueError(f"{what} {name!r} is registered twice")
        table[name] = builder
        return builder

    return wrap


def register(name: str):
    return _registrar(_BUILDERS, "method", name)


def register_llm(name: str):
    return _registrar(_LLM_PLANS, "in-LLM stage", name)


def _load_methods() -> None:
    from ivtp.methods import fastv, ivtp, peers, sparsevlm, visiondrop  # noqa: F401  (importing registers them)


def build_vision_runner(config, tower_config, feature_layer: int) -> VisionRunner:
    _load_methods()
    name = config.base_method
    if name not in _BUILDERS:
        raise KeyError(f"no runner registered for method {name!r}")
    return _BUILDERS[name](config, tower_config, feature_layer)


def build_llm_plan(config, num_layers: int, tokens_in: int):
    """The in-LLM plan of `config` on an LLM of num_layers layers fed tokens_in visual tokens per image, or None.
    IVTP's stage 2 serves ivtp and the "+" variants."""
    _load_methods()
    name = "ivtp" if config.uses_llm_stage else config.method
    plan = _LLM_PLANS.get(name)
    return None if plan is None else plan(config, num_layers, tokens_in)


__all__ = ["register", "register_llm", "build_vision_runner", "build_llm_plan", "VisionRunner"]
