"""FastV (Chen et al., ECCV 2024), as its code runs: layers 0..K-1 see every visual token; the last prompt token's
attention at layer K-1 (each head's softmax over its whole causal row, then the head mean), read at the image
columns, ranks them; the top round((1 - R) N), or `keep`, go on from layer K with their original positions.
Nothing is pruned before the LLM."""

from __future__ import annotations

import torch

from ivtp.config import ConfigError, resolve_budget
from ivtp.methods import register, register_llm
from ivtp.methods.base import LLMStep
from ivtp.ops import keep_topk_per_row
from ivtp.patch.llama import LLMPlan


class FastVStep(LLMStep):
    prefix = "fastv"  # its query: the default guidance, each row's last prompt token
    known_counts = True

    def probe(self, run, g, lo, hi, idx, layer, hidden):
        # One rater per row: the slot still holding the prompt's last position.
        positions = run.g.last_prompt[:, None] == torch.arange(run.length, device=run.slot_pos.device)  # (B, L)
        return run.rater_probe(run.text_slots(positions), width=1)

    def after_layer(self, run, g, lo, hi, idx, hidden):
        probe = run.last_probe
        scores = probe["attn_visual"][:, :, 0].mean(1)  # (B', H, 1, Nv) -> (B', Nv): head mean, not renormalised
        run.trace.scores.append(scores)
        k = run.budget(run.plan.counts[g])  # (B',)
        return run.drop_visual(hidden, probe, keep_topk_per_row(scores, k, probe["vis_ok"]), idx, run.plan.counts[g])


def make_fastv_plan(section, num_layers: int, tokens_in: int) -> LLMPlan:
    """FastV's K: the one step scores at, and prunes after, layer K - 1."""
    if section.layer >= num_layers:
        raise ConfigError(f"fastv.layer: K={section.layer} leaves no layer to prune (the model has {num_layers} "
                          f"decoder layers: K is at most {num_layers - 1})")
    if section.keep is not None:
        keep = resolve_budget(section.keep, tokens_in, "fastv.keep")
    else:
        keep = max(1, int(round(tokens_in * (1 - section.ratio))))
    k = section.layer - 1
    return LLMPlan([(k, k)], [keep], tokens_in, FastVStep())


@register_llm("fastv")
def plan(config, num_layers: int, tokens_in: int) -> LLMPlan:
    return make_fastv_plan(config.fastv, num_layers, tokens_in)


@register("fastv")
def build(config, tower_config, feature_layer: int):
    """Before the LLM, every patch goes through."""
    from ivtp.methods.ivtp import GTPRunner

    return GTPRunner.passthrough(tower_config, feature_layer)
