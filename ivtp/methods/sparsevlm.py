"""SparseVLM (Zhang et al., ICML 2025), v1.5 of its code: text raters chosen from the input embeddings; after LLM
layers 2, 6 and 15 the visual tokens the raters attend to most stay, and the best deleted ones are recycled into
cluster means (the tensor algorithms: ivtp/ops/sparsevlm.py; notes: docs/sparsevlm_notes.md). Nothing is pruned
before the LLM."""

from __future__ import annotations

import torch

from ivtp.config import ConfigError
from ivtp.methods import register, register_llm
from ivtp.methods.base import LLMStep
from ivtp.ops.sparsevlm import (score_visual, select_raters, sparsevlm_prune, sparsevlm_schedule,
                                sparsevlm_visual_counts, text_relevance)
from ivtp.patch.llama import LLMGuidance, LLMPlan


class SparseVLMStep(LLMStep):
    """A stage on its layer's output: keep the visual tokens the raters attend to most; recycle the best deleted
    ones into cluster means, each placed in its cluster centre's slot (docs/methods.md)."""

    prefix = "sparsevlm"

    def __init__(self, keeps: list[int], recycle: bool, renumber: bool = True):
        self.keeps = keeps  # per stage: tokens kept per image, before recycling
        self.recycle = recycle
        self.renumber = renumber  # v1.5: rebuild [prefix, kept, recycled, text] and number it again

    def guidance(self, embed, input_ids, visual, instr, images, attention_mask, prompt_len, image_features):
        """The text raters, from the input embeddings: the instruction tokens whose softmax relevance to the row's
        visual tokens is above the mean."""
        embeds = embed(input_ids)  # (B, L, D)
        raters = torch.zeros_like(visual)
        feats = iter(image_features)
        for r, need in enumerate(visual.sum(-1).tolist()):
            row_images = []  # the row's images, taken in order until their tokens fill its placeholders
            while sum(len(f) for f in row_images) < need:
                row_images.append(next(feats))
            text_pos = torch.nonzero(instr[r]).flatten()
            if not row_images:
                continue
            if len(text_pos) == 0:  # SparseVLM ranks the image by the text's attention: no text, no ranking
                raise ValueError(
                    f"sparsevlm: row {r} has an image but no instruction text after it to rate the visual tokens "
                    "(the prompt ends at the image, or the labels supervise the instruction too: only unsupervised "
                    "tokens after the last image count). SparseVLM needs a text prompt; IVTP falls back to the "
                    "image's [CLS] instead")
            vis = torch.cat(row_images)[None].to(embeds.dtype)  # (1, Nv, D)
            chosen = select_raters(text_relevance(vis, embeds[r, text_pos][None]))[0]  # (Nt,)
            raters[r, text_pos[chosen]] = True
        return LLMGuidance(visual=visual, images=images, text_select=raters,
                           fallback=torch.zeros(len(images), 1, device=visual.device))

    def probe(self, run, g, lo, hi, idx, layer, hidden):
        return run.rater_probe(run.text_slots(run.g.text_select))  # the raters, as slots

    def after_layer(self, run, g, lo, hi, idx, hidden):
        probe = run.last_probe
        scores = score_visual(probe["attn_visual"], probe["rater_ok"])  # (B', Nv)
        keep_slots = torch.zeros_like(run.slot_visual)
        recycled_slots = {}  # per row: the cluster centres' slots, which the recycled tokens take
        hidden = hidden.clone()
        budgets = run.budget(self.keeps[g]).tolist()  # per scored row
        for i, r in enumerate(run.row_list):
            n_vis = int(probe["vis_ok"][i].sum())
            vis = probe["vis_idx"][i, :n_vis]  # (Nv,) slots, ascending
            res = sparsevlm_prune(hidden[r, vis][None], scores[i : i + 1, :n_vis], budgets[i],
                                  self.recycle)
            keep_slots[r, vis[res.kept[0]]] = True
            if res.recycled is not None:
                centres = vis[res.deleted[0, res.recycled.centers[0]]]
                keep_slots[r, centres] = True
                hidden[r, centres] = res.recycled.tokens[0].to(hidden.dtype)
                recycled_slots[r] = centres  # renumbered: after the kept ones, in cluster order (as v1.5 appends)
        return run.keep_visual(hidden, keep_slots, idx, recycled_slots if self.renumber else None)


@register_llm("sparsevlm")
def plan(config, num_layers: int, tokens_in: int) -> LLMPlan:
    """Prune the outputs of its schedule's layers to its counts (kept plus recycled)."""
    section = config.sparsevlm
    stages = sparsevlm_schedule(section.budget)
    for stage in stages:
        if stage.layer >= num_layers:
            raise ConfigError(f"sparsevlm: it prunes at layer {stage.layer}, past the model's last ({num_layers - 1})")
    counts = sparsevlm_visual_counts(stages, tokens_in, section.recycle)
    return LLMPlan([(st.layer, st.layer) for st in stages], counts, tokens_in,
                   SparseVLMStep([st.keep for st in stages], section.recycle, section.positions == "renumber"))


@register("sparsevlm")
def build(config, tower_config, feature_layer: int):
    """Before the LLM, every patch goes through."""
    from ivtp.methods.ivtp import GTPRunner

    return GTPRunner.passthrough(tower_config, feature_layer)
