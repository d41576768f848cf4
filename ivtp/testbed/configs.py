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


# Our extensions (config overrides of the vision and llm sections), measured against the paper's form. A name is
# "<geometry>:<guidance>": "paper" keeps the paper's geometry (stage 1 to 14, stage 2 over layers 0-2), "early"
# drops in the LLM after layer 0 and lets stage 1 keep 28 (the same visual tokens x LLM layers: 14 x 3 + 7 x 3 =
# 28 + 7 x 5), so that the instruction decides more of the selection; "llm_only" drops after layer 0 from all 64.
# Each geometry has its random-query control.
QUESTION = {"instruction": "question", "relevance": "standardised", "tau": 1.0}
EARLY_VISION, EARLY_LLM = {"keep": 28}, {"layers": 1, "group_size": 1}
LAYER1_LLM = {"layers": 2, "group_size": 2, "aggregation": "single_layer"}
EXTENSIONS = {
    "paper:clip": ({}, {}),
    "paper:question": ({}, QUESTION),
    "paper:question+own_rows": ({}, {**QUESTION, "aggregation": "mean"}),
    "paper:none": ({}, {"guidance": "none"}),
    "paper:random": ({}, {"guidance": "random"}),
    "early:clip": (EARLY_VISION, EARLY_LLM),
    "early:question": (EARLY_VISION, {**EARLY_LLM, **QUESTION}),
    "early:none": (EARLY_VISION, {**EARLY_LLM, "guidance": "none"}),
    "early:random": (EARLY_VISION, {**EARLY_LLM, "guidance": "random"}),
    # Stage 1 off: the instruction chooses 7 of all 64 after layer 0 (more compute: 64 + 7 x 5 token-layers).
    "llm_only:clip": ({"enabled": False}, EARLY_LLM),
    "llm_only:question": ({"enabled": False}, {**EARLY_LLM, **QUESTION}),
    "llm_only:none": ({"enabled": False}, {**EARLY_LLM, "guidance": "none"}),
    "llm_only:random": ({"enabled": False}, {**EARLY_LLM, "guidance": "random"}),
    # The same, scored with layer 1's row alone (dropping after layer 1): does a later layer's query find the
    # object better than layer 0's? (Measured: no, 2026-12-05.)
    "llm_only@1:clip": ({"enabled": False}, LAYER1_LLM),
    "llm_only@1:random": ({"enabled": False}, {**LAYER1_LLM, "guidance": "random"}),
}
# The extension with the most kept tokens on the question's object at the best accuracy on the tb32 testbed's fresh
# split (docs/testbed.md, 2026-12-05); its tau sweep is the `tau_extended` suite.
BEST_EXTENSION = "llm_only:question"


def extension_config(name: str, tokens: int, llm_layers: int, aligner: str | None = None) -> PruneConfig:
    """IVTP at `tokens` in the form EXTENSIONS names ("paper:clip" is the paper's own)."""
    if name not in EXTENSIONS:
        raise ValueError(f"{name}: not an extension (choose from {', '.join(EXTENSIONS)})")
    vision, llm = EXTENSIONS[name]
    return fit_prune_config("ivtp", tokens, llm_layers, aligner=aligner, vision=vision, llm=llm)


def write_yaml(config: PruneConfig, path: str) -> str:
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    return path
