"""IVTP: stage 1 as a runner, GTP inside the CLIP tower (ivtp/patch/clip.py); stage 2 as the step the patched
decoder runs in the first LLM layers (ivtp/patch/llama.py), which also follows the "+" variants' runners."""

from __future__ import annotations

from ivtp.config import ConfigError, LLMStage, resolve_budget
from ivtp.methods import register, register_llm
from ivtp.methods.base import LLMStep, VisionRunner
from ivtp.ops import aggregate_group, gtp_scores, keep_topk_per_row, probe_modes
from ivtp.patch.clip import (VisionPlan, group_layers, make_vision_plan, passthrough_plan, prune_vision_tower,
                             resolve_schedule, tower_patches)
from ivtp.patch.llama import LLMPlan


class GTPRunner(VisionRunner):
    def __init__(self, plan: VisionPlan):
        self.plan = plan
        self.num_patches = plan.num_patches
        self.tokens_per_image = plan.keep
        self.layers_used = plan.layers_used

    def step_names(self) -> list[str]:
        return self.plan.step_names()

    @classmethod
    def passthrough(cls, tower_config, feature_layer: int) -> "GTPRunner":
        """Every patch goes through (stage 1 off, or a method that prunes only inside the LLM)."""
        return cls(passthrough_plan(tower_config.num_hidden_layers, feature_layer, tower_patches(tower_config)))

    def run(self, tower, pixel_values, want_final_cls):
        return prune_vision_tower(tower, pixel_values, self.plan, want_final_cls)

    def vit_tokens_per_layer(self) -> list[int]:
        """A group runs at the count the previous group left; pruning follows its top layer."""
        out, current = [], self.num_patches
        for (lo, hi), count in zip(self.plan.groups, self.plan.counts):
            out += [current + 1] * (hi - lo + 1)
            current = count
        return out


@register("ivtp")
def build(config, tower_config, feature_layer: int) -> GTPRunner:
    if not config.vision.enabled:
        return GTPRunner.passthrough(tower_config, feature_layer)
    return GTPRunner(make_vision_plan(config.vision, tower_config.num_hidden_layers, feature_layer,
                                      tower_patches(tower_config)))


# ---- stage 2: GTP inside the first LLM layers, guided by the pseudo-CLS (eqs. 3-4, 8) -----------------------------
class GTPStep(LLMStep):
    """Each group's lower layers give their head-mean attention among {visual tokens, pseudo-CLS}, its top layer the
    pseudo-CLS row; the rollout (or the configured aggregation) of that row times ||V|| ranks the visual tokens,
    and the top count per image stay."""

    known_counts = True

    def __init__(self, aggregation: str):
        self.aggregation = aggregation

    def guidance(self, *args):
        return None  # the pseudo-CLS: the LLaVA level builds it (CLIP-text selection, the visual [CLS] fallback)

    def probe(self, run, g, lo, hi, idx, layer, hidden):
        mode = probe_modes(self.aggregation, hi - lo + 1)[idx - lo]
        return None if mode is None else run.pseudo_cls_probe(mode, layer, hidden)

    def after_layer(self, run, g, lo, hi, idx, hidden):
        probe = run.last_probe
        if probe is None:
            return hidden
        maps, rows = run.scratch.setdefault("lower", []), run.scratch.setdefault("rows", [])
        if probe["mode"] == "full":  # a lower layer's map among {visual tokens, pseudo-CLS}
            maps.append(probe["attn"])
        else:  # the pseudo-CLS row
            rows.append(probe["row"])
        if idx != hi:
            return hidden
        row = aggregate_group(self.aggregation, maps, rows, query_index=-1)  # (B', Nv + 1)
        scores = gtp_scores(row, probe["vnorm"], query_index=-1)  # (B', Nv)
        run.scratch.clear()
        run.trace.scores.append(scores)
        k = run.budget(run.plan.counts[g])  # (B',) the per-image budget times the images in the row
        return run.drop_visual(hidden, probe, keep_topk_per_row(scores, k, probe["vis_ok"]), idx, run.plan.counts[g])


def make_llm_plan(stage: LLMStage, num_layers: int, tokens_in: int) -> LLMPlan:
    """IVTP's stage 2 over the first `stage.layers` decoder layers, in groups, down to `stage.keep`."""
    if stage.layers > num_layers:
        raise ConfigError(f"llm.layers: {stage.layers} is deeper than the model's {num_layers} decoder layers")
    keep = resolve_budget(stage.keep, tokens_in, "llm.keep")
    g = stage.effective_group_size
    groups = group_layers(0, stage.layers, g)
    counts = resolve_schedule(stage.schedule, keep, tokens_in, len(groups), "llm",
                              f"{stage.layers} layers in groups of {g}")
    return LLMPlan(groups, counts, tokens_in, GTPStep(stage.aggregation))


@register_llm("ivtp")
def plan(config, num_layers: int, tokens_in: int) -> LLMPlan | None:
    """Stage 2 (also after the "+" variants' runners); None when `llm.enabled` is off."""
    return make_llm_plan(config.llm, num_layers, tokens_in) if config.uses_llm_stage else None
