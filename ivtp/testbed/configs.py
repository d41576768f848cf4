"""Prune configs for the testbed's geometry: 64 patches from a 7-layer ViT (6 feed LLaVA) and a 6-layer LLM.

`PruneConfig.for_method(method, k)` sets budgets; the layer indices of the paper's 32-layer LLM (IVTP's first 12
layers, VisionDrop's 8/16/24) are scaled to the testbed LLM's depth here, and IVTP's stage 2 gets the
testbed's own aligner. SparseVLM is left out: its schedule is tied to 576 tokens and layers 2/6/15.
"""

from __future__ import annotations

import os

from ivtp.config import METHODS, PruneConfig

PAPER_LLM_LAYERS = 32
TESTBED_METHODS = tuple(m for m in METHODS if m != "sparsevlm")


def scale_layer(layer: int, llm_layers: int) -> int:
    """A layer index of the paper's 32-layer LLM at the same relative depth of an `llm_layers`-layer LLM."""
    return max(1, min(llm_layers - 1, round(layer * llm_layers / PAPER_LLM_LAYERS)))


def fit_prune_config(method: str, tokens: int, llm_layers: int, aligner: str | None = None,
                         **overrides) -> PruneConfig:
    """`method` at `tokens` final visual tokens, fitted to the testbed; `overrides` are sections to merge in
    (e.g. vision={"group_size": 2}) for ablations."""
    if method not in TESTBED_METHODS:
        raise ValueError(f"{method}: not run on the testbed (methods: {', '.join(TESTBED_METHODS)})")
    d = PruneConfig.for_method(method, tokens).to_dict()
    if "llm" in d:  # IVTP's stage 2 (ivtp, topk+, tome+): the first 12 of 32 layers -> one group of 3 of 6
        d["llm"].update(layers=3, group_size=3)
        if aligner is not None:
            d["llm"]["aligner"] = {"model": "ivtp-testbed-clip", "pretrained": os.path.abspath(aligner)}
    if "visiondrop" in d:
        layers = []
        for layer, dom, ctx in d["visiondrop"]["llm"]:
            scaled = scale_layer(layer, llm_layers)
            if layers and scaled <= layers[-1][0]:
                scaled = layers[-1][0] + 1
            layers.append([scaled, dom, ctx])
        d["visiondrop"]["llm"] = [stage for stage in layers if stage[0] < llm_layers]
    for section, values in overrides.items():
        d.setdefault(section, {}).update(values)
    return PruneConfig.from_dict(d)


def write_yaml(config: PruneConfig, path: str) -> str:
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    return path
