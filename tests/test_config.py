import glob
import json
import os

import pytest

from ivtp import ConfigError, PruneConfig
from ivtp.config import resolve_budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_defaults_are_the_paper_setting_spelled_out_by_ivtp_64():
    cfg = PruneConfig()
    assert cfg.method == "ivtp"
    assert (cfg.vision.group_size, cfg.vision.keep, cfg.vision.schedule) == (3, 128, "linear")
    assert (cfg.llm.enabled, cfg.llm.layers, cfg.llm.group_size, cfg.llm.keep, cfg.llm.tau) == (True, 12, 3, 64, 0.2)
    assert (cfg.llm.guidance, cfg.llm.aggregation, cfg.vision.aggregation) == ("clip", "rollout", "rollout")
    assert (cfg.llm.aligner.model, cfg.llm.aligner.pretrained) == ("ViT-L-14-336", "openai")
    assert PruneConfig.from_yaml(os.path.join(ROOT, "configs", "ivtp_64.yaml")).to_dict() == cfg.to_dict()


def test_dict_round_trip_and_saved_file(tmp_path):
    cfg = PruneConfig.from_dict({"vision": {"group_size": 2, "keep": 0.25, "schedule": [0.75, 0.5, 0.25]}})
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg
    path = cfg.save_pretrained(tmp_path)
    assert os.path.basename(path) == "ivtp_config.json"
    assert json.load(open(path))["vision"]["schedule"] == [0.75, 0.5, 0.25]
    assert PruneConfig.from_pretrained(tmp_path) == cfg
    assert PruneConfig.load(str(tmp_path)) == cfg


@pytest.mark.parametrize(
    "data, key",
    [
        ({"metod": "ivtp"}, "metod"),
        ({"vision": {"kep": 64}}, "vision.kep"),
        ({"llm": {"threshold": 0.2}}, "llm.threshold"),
        ({"method": "fastvv"}, "method"),
        ({"vision": {"group_size": 0}}, "vision.group_size"),
        ({"vision": {"group_size": 2.0}}, "vision.group_size"),
        ({"vision": {"keep": 0}}, "vision.keep"),
        ({"vision": {"keep": 1.5}}, "vision.keep"),
        ({"vision": {"keep": 0.0}}, "vision.keep"),
        ({"vision": {"keep": True}}, "vision.keep"),
        ({"vision": {"keep": "64"}}, "vision.keep"),
        ({"vision": {"enabled": "yes"}}, "vision.enabled"),
        ({"vision": {"schedule": "cosine"}}, "vision.schedule"),
        ({"vision": {"schedule": []}}, "vision.schedule"),
        ({"vision": {"keep": 20, "schedule": [10, 20]}}, "vision.schedule[1]"),
        ({"vision": {"keep": 64, "schedule": [128, 96]}}, "vision.schedule"),
        ({"vision": {"schedule": [128, -3]}}, "vision.schedule[1]"),
        ({"llm": {"tau": 1.5}}, "llm.tau"),
        ({"llm": {"layers": 0}}, "llm.layers"),
        ({"llm": {"enabled": 1}}, "llm.enabled"),
        ({"llm": {"tau": -1.01}}, "llm.tau"),
        ({"llm": {"guidance": "text"}}, "llm.guidance"),
        ({"llm": {"aggregation": "sum"}}, "llm.aggregation"),
        ({"vision": {"aggregation": "rollouts"}}, "vision.aggregation"),
        ({"llm": {"aligner": {"name": "x"}}}, "llm.aligner.name"),
        ({"llm": {"aligner": {"pretrained": 3}}}, "llm.aligner.pretrained"),
        ({"llm": {"keep": 64, "schedule": [96, 80]}}, "llm.schedule"),
        ({"vision": [1, 2]}, "vision"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        PruneConfig.from_dict(data)
    assert key in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("vision:\n  keep: 64\n  group_sise: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*vision.group_sise"):
        PruneConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError):
        PruneConfig.from_yaml(tmp_path / "missing.yaml")


def test_resolve_budget():
    assert resolve_budget(64, 576, "k") == 64
    assert resolve_budget(1.0, 576, "k") == 576
    assert resolve_budget(1 / 9, 576, "k") == 64
    assert resolve_budget(0.001, 576, "k") == 1  # a ratio never rounds to zero tokens
    with pytest.raises(ConfigError, match="larger than the 576"):
        resolve_budget(577, 576, "vision.keep")


NEXT_CONFIGS = [p for p in CONFIGS if os.sep + "next" + os.sep in p]  # LLaVA-NeXT's own: budgets per image


@pytest.mark.parametrize("path", NEXT_CONFIGS, ids=[os.path.relpath(p, ROOT) for p in NEXT_CONFIGS])
def test_every_shipped_next_config_applies_to_llava16_geometry(path):
    """configs/next/ apply to a model with LLaVA-1.6's geometry (576 patches per crop, its grids of 3-5 crops, 32
    LLM layers), each image handing the LLM stage what the config says whatever its crops."""
    from ivtp import apply_pruning
    from ivtp.models import tiny_aligner, tiny_random_next

    cfg = PruneConfig.from_yaml(path)
    assert cfg.anyres.budget == "per_image"
    model, processor = tiny_random_next(num_hidden_layers=24)
    apply_pruning(model, cfg, aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    state = model.ivtp_state
    assert state.layout.units_are_images and state.vision.num_patches == 576
    if cfg.method == "ivtp":
        assert state.tokens_per_image == cfg.vision.keep and state.llm_plan.counts[-1] == cfg.llm.keep
    else:
        assert state.layout.stock and state.llm_plan.counts[-1] == cfg.fastv.keep


CONFIGS_15 = [p for p in CONFIGS if p not in NEXT_CONFIGS]


@pytest.mark.parametrize("path", CONFIGS_15, ids=[os.path.relpath(p, ROOT) for p in CONFIGS_15])
def test_every_shipped_config_loads_and_applies_to_llava15_geometry(path):
    """Every YAML validates, and applies to a model with LLaVA-1.5's depth and token geometry (24 ViT layers,
    feature layer -2, 336 px / 14 = 576 patches; 32 LLM layers), resolving to schedules that end at its keeps."""
    from ivtp import apply_pruning
    from ivtp.models import tiny_aligner, tiny_random

    cfg = PruneConfig.from_yaml(path)
    model, processor = tiny_random(num_hidden_layers=24)
    apply_pruning(model, cfg, aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    state = model.ivtp_state
    assert state.vision.layers_used == 23 and state.vision.num_patches == 576
    if cfg.method == "ivtp":
        plan = state.vision.plan
        vision_keep = resolve_budget(cfg.vision.keep, 576, "keep") if cfg.vision.enabled else 576
        assert plan.keep == vision_keep
        if cfg.vision.enabled:
            assert len(plan.groups) == -(-23 // cfg.vision.effective_group_size)
            assert all(a >= b for a, b in zip([576] + plan.counts, plan.counts))
    else:
        section = getattr(cfg, cfg.base_method)
        if cfg.method == "visiondrop":
            vision_keep = section.dominant + section.contextual
        elif cfg.method == "sparsevlm":
            vision_keep = 576
        else:
            budget = getattr(section, "visual_token_num", getattr(section, "keep", None))
            vision_keep = 576 if cfg.method == "fastv" else resolve_budget(budget, 576, "keep")
        assert state.tokens_per_image == vision_keep
    if cfg.uses_llm_stage:
        llm = state.llm_plan
        assert llm.counts[-1] == resolve_budget(cfg.llm.keep, vision_keep, "keep")
        assert len(llm.groups) == -(-cfg.llm.layers // cfg.llm.effective_group_size)
        assert llm.groups[-1][1] == cfg.llm.layers - 1
    elif cfg.method == "fastv":
        assert state.llm_plan.counts == [resolve_budget(cfg.fastv.keep, 576, "keep")]
    elif cfg.method == "visiondrop":
        assert state.llm_plan.counts == [d + c for _, d, c in cfg.visiondrop.llm]
    elif cfg.method == "sparsevlm":
        assert [g[0] for g in state.llm_plan.groups] == [2, 6, 15]
    else:
        assert state.llm_plan is None


def test_the_anyres_layout_is_any_methods_and_saved_only_when_set():
    """LLaVA-NeXT's layout of a pruned image: auto resolves to VisPruner's own (stock) for vispruner and to the
    survivors for every other method; a config that leaves it alone saves as before."""
    assert PruneConfig.for_method("vispruner").anyres_layout == "stock"
    assert PruneConfig.for_method("topk").anyres_layout == "survivors"
    assert "anyres" not in PruneConfig.for_method("topk").to_dict()
    chosen = PruneConfig.from_dict({"method": "topk", "topk": {"keep": 16}, "anyres": {"layout": "stock"}})
    assert chosen.anyres_layout == "stock" and chosen.to_dict()["anyres"] == {"layout": "stock"}
    assert PruneConfig.from_dict(chosen.to_dict()) == chosen
    with pytest.raises(ConfigError, match="anyres.layout: expected one of auto, survivors, stock"):
        PruneConfig.from_dict({"method": "topk", "anyres": {"layout": "newlines"}})
