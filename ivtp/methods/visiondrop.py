"""VisionDrop (Xu et al.), visual-only progressive pruning: an encoder stage (VisionZip-style) at CLIP layer -2,
then stages at the inputs of chosen LLM layers. Each stage keeps the dominant tokens by visual attention and merges
the rest into contextual tokens by key similarity (the tensor algorithms: ivtp/ops/peers.py)."""

from __future__ import annotations

import torch

from ivtp.config import ConfigError
from ivtp.methods import register, register_llm
from ivtp.methods.base import LLMStep, encode, output
from ivtp.methods.peers import PeerRunner
from ivtp.ops.peers import visiondrop_encoder, visiondrop_llm_scores, visiondrop_merge
from ivtp.patch.llama import LLMPlan


class VisionDropRunner(PeerRunner):
    """The encoder stage at layer -2: `dominant` tokens by [CLS] attention, then `contextual` tokens merged from the
    rest by key similarity; the LLM sees the dominant ones in sequence order ([CLS] first, when `cls`, as its
    authors' code hands it on), then the contextual ones."""

    name = "visiondrop"

    def budget(self) -> int:
        total = self.section.dominant + self.section.contextual
        if total - self.section.cls > self.num_patches:
            raise ConfigError(f"visiondrop: dominant + contextual ({total}) is more than the "
                              f"{self.num_patches} patches{' and [CLS]' if self.section.cls else ''}")
        return total

    def run(self, tower, pixel_values, want_final_cls):
        hidden, probe = encode(tower, pixel_values, self.layers_used)
        cls = hidden[:, :1]  # (B, 1, D)
        patches = self.section.dominant - self.section.cls  # [CLS] takes one of the dominant places
        res = visiondrop_encoder(probe["row"][:, 1:], probe["keys"][:, 1:], hidden[:, 1:], patches,
                                 self.section.contextual)
        tokens = torch.cat([cls, res.tokens], dim=1) if self.section.cls else res.tokens  # (B, d + c, D)
        out = torch.cat([cls, tokens], dim=1)  # (B, 1 + d + c, D): the tower's [CLS] slot, then the LLM's tokens
        return output(tower, out, res.dominant, [self.num_patches, self.tokens_per_image], want_final_cls,
                      self.layers_used, first=int(self.section.cls))


class VisionDropStep(LLMStep):
    """One LLM stage at the input of layer idx + 1: score the visual tokens with that layer's own q/k (head mean,
    then query mean, causal), keep the dominant ones, merge the rest into contextual tokens.

    renumber (its authors' code): the sequence is rebuilt from the survivors, [prefix, dominant tokens in order,
    contextual tokens, the rest], and numbered 0, 1, ... again. Without (ours): every survivor keeps its position
    and a contextual token takes its target's."""

    prefix = "visiondrop"
    layers_after = 1  # it scores with the layer after its group

    def __init__(self, splits: list[tuple[int, int]], renumber: bool = True):
        self.splits = splits  # per stage: (dominant, contextual) per image
        self.renumber = renumber

    def after_layer(self, run, g, lo, hi, idx, hidden):
        layer = run.model.layers[idx + 1]
        dominant, contextual = self.splits[g]
        keep_slots = torch.zeros_like(run.slot_visual)
        contextual_slots = {}  # per row: the targets' slots, which the contextual tokens take
        positions = run.current_positions()
        hidden = hidden.clone()
        for r in run.row_list:  # rows differ in visual counts; B is small
            vis = torch.nonzero(run.slot_visual[r]).flatten()  # (Nv,) slots, ascending
            slots = torch.arange(hidden.shape[1], device=hidden.device)
            prefix = torch.nonzero(run.slot_ok[r] & (slots < vis[0])).flatten()
            tokens = torch.cat([prefix, vis])
            pos = positions[r, tokens][None]  # (1, P + Nv)
            q, k = run.query_key(layer, hidden[r, tokens][None], pos)  # (1, H, P + Nv, Dh), (1, Hkv, ...)
            p = len(prefix)
            with torch.no_grad():
                scores = visiondrop_llm_scores(q[:, :, p:], k[:, :, p:], layer.self_attn.scaling, prefix_k=k[:, :, :p])
            n_img = run.images[r]
            res = visiondrop_merge(scores, k[:, :, p:].float().mean(1), hidden[r, vis][None],
                                   dominant * n_img, contextual * n_img)
            keep_slots[r, vis[res.dominant[0]]] = True
            targets = vis[res.targets[0]]
            keep_slots[r, targets] = True
            hidden[r, targets] = res.tokens[0, dominant * n_img :]  # contextual tokens sit at their targets' slots
            contextual_slots[r] = targets  # renumbered: after the dominant ones, in target order
        return run.keep_visual(hidden, keep_slots, idx, contextual_slots if self.renumber else None)


@register_llm("visiondrop")
def plan(config, num_layers: int, tokens_in: int) -> LLMPlan | None:
    """Stage [L, d, c] prunes the input of layer L, i.e. after layer L - 1; None without LLM stages."""
    section = config.visiondrop
    if not section.llm:
        return None
    for layer, _, _ in section.llm:
        if layer >= num_layers:
            raise ConfigError(f"visiondrop.llm: layer {layer} is past the model's last decoder layer ({num_layers - 1})")
    groups = [(layer - 1, layer - 1) for layer, _, _ in section.llm]
    return LLMPlan(groups, [d + c for _, d, c in section.llm], tokens_in,
                   VisionDropStep([(d, c) for _, d, c in section.llm], section.positions == "renumber"))


register("visiondrop")(lambda config, tower_config, feature_layer:
                       VisionDropRunner(config.visiondrop, tower_config, feature_layer))
