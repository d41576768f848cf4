"""The runner interface, and the tower walk every method before the LLM shares."""

from __future__ import annotations

import torch
from torch import nn

from ivtp.patch.clip import CLS_INDEX, VisionOutput, VisionTrace, final_cls
from ivtp.patch.probe import Probe


class VisionRunner:
    """Turns pixel values into the visual tokens each image hands the LLM."""

    num_patches: int
    tokens_per_image: int
    layers_used: int

    def step_names(self) -> list[str]:
        return []

    def vit_tokens_per_layer(self) -> list[int]:
        """Tokens ([CLS] included) each feature layer runs on, for FLOPs accounting. Unpruned by default."""
        return [self.num_patches + 1] * self.layers_used

    @property
    def prunes(self) -> bool:
        """Whether any patch is dropped or merged before the LLM."""
        return self.tokens_per_image < self.num_patches

    def at(self, count: int) -> "VisionRunner":
        """The runner for a crop that keeps `count` tokens (LLaVA-NeXT: anyres.AnyResLayout.crop_budgets)."""
        if count != self.tokens_per_image:
            raise ValueError(f"this runner keeps {self.tokens_per_image} tokens per crop, not {count}")
        return self

    def run(self, tower: nn.Module, pixel_values: torch.Tensor, want_final_cls: bool) -> VisionOutput:
        raise NotImplementedError


class PerImageRunner(VisionRunner):
    """LLaVA-NeXT with `anyres.budget: per_image`: stage 1's count is the whole image's, split over its crops
    (anyres.split_budget), so crops of one batch keep different counts. It holds the method's runner at each count
    a crop can get; the crops run in one batch per count. tokens_per_image is the image's count."""

    def __init__(self, runners: dict[int, VisionRunner], total: int):
        self.runners = runners
        one = next(iter(runners.values()))
        self.num_patches, self.layers_used, self.tokens_per_image = one.num_patches, one.layers_used, total

    @property
    def prunes(self) -> bool:
        return any(r.prunes for r in self.runners.values())

    def at(self, count: int) -> VisionRunner:
        return self.runners[count]

    def step_names(self) -> list[str]:
        return next(iter(self.runners.values())).step_names()

    def vit_tokens_per_layer(self) -> list[int]:
        raise TypeError("per-image budgets price each crop at its own count: at(count).vit_tokens_per_layer()")

    def run(self, tower, pixel_values, want_final_cls):
        raise TypeError("per-image budgets run each crop at its own count: at(count).run(...)")


class LLMStep:
    """A method's pruning inside the LLM, as the patched decoder (ivtp/patch/llama.py) runs it: at the layers of
    each plan group (g, lo, hi) it asks for a probe, then may drop visual tokens. `run` is the decoder's
    _PrefillRun: its probes (new_probe, rater_probe, pseudo_cls_probe), slots and drops (drop_visual, drop_slots)."""

    prefix = "llm"  # step names: <prefix>.layers<lo>-<hi>
    # Every image keeps the plan's count at each drop (drop_visual's per_image): the host knows every width ahead,
    # so a compiled prefill can run the step (ivtp/compiled.py).
    known_counts = False
    layers_after = 0  # layers past a group's top that its scoring reads (VisionDrop scores with the next one)

    def guidance(self, embed, input_ids, visual, instr, images, attention_mask, prompt_len, image_features):
        """What the decoder is handed for one prefill (an LLMGuidance), or None for IVTP's pseudo-CLS guidance,
        which the LLaVA level builds. visual, instr: (B, L) bool, the placeholders and the instruction; images:
        (B,) per row; embed: the LLM's input embeddings; image_features: the images' features, in row order.
        By default, each row's last prompt token (FastV's query; prompt_len: where generate's prompt ends)."""
        from ivtp.patch.llama import LLMGuidance

        idx = torch.arange(visual.shape[1], device=visual.device)[None]
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual)
        if prompt_len is not None:  # generate without a cache re-runs prompt + answer: the prompt's end
            real = real & (idx < prompt_len)
        return LLMGuidance(visual=visual, images=images, text_select=torch.zeros_like(visual),
                           fallback=torch.zeros(len(images), 1, device=visual.device),
                           last_prompt=torch.where(real, idx, -1).max(-1).values)

    def probe(self, run, g: int, lo: int, hi: int, idx: int, layer, hidden):
        """The probe layer idx's attention fills, or None (the stock layer runs)."""
        return None

    def after_layer(self, run, g: int, lo: int, hi: int, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """After layer idx: the hidden states, with visual tokens dropped where the step prunes."""
        raise NotImplementedError


def encode(tower: nn.Module, pixel_values: torch.Tensor, used: int, probe_last: bool = True):
    """Run the feature layers unpruned. Returns the feature layer's tokens (B, 1 + N, D) and, from its last layer,
    the head-mean [CLS] attention row (B, 1 + N), ||V|| (B, 1 + N) and the head-mean keys (B, 1 + N, Dh)."""
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (B, 1 + N, D)
    probe: Probe | None = None
    for idx, layer in enumerate(tower.encoder.layers[:used]):
        last = probe_last and idx == used - 1
        probe = Probe(mode="row", keys=True) if last else None
        hidden = layer(hidden, None, ivtp_probe=probe)
    return hidden, probe or Probe()


def attention_half(layer: nn.Module, hidden: torch.Tensor, bias=None, probe: Probe | None = None) -> torch.Tensor:
    """A CLIP encoder layer up to its attention's residual add: where ToMe merges and EViT prunes, before the MLP.
    hidden: (B, n, D); bias: additive logits (B, 1, 1, n) or None; probe: the patched attention's probe."""
    attn, _ = layer.self_attn(layer.layer_norm1(hidden), bias, ivtp_probe=probe)
    return hidden + attn


def mlp_half(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The rest of the layer: its MLP with its residual (token-wise, so it runs on whatever tokens remain)."""
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def output(tower, hidden, kept, counts, want_final_cls, used, first: int = 0) -> VisionOutput:
    """Package a runner's result. hidden: (B, 1 + K, D) with [CLS] first; kept: (B, P) original patch indices of
    the tokens first..first + P - 1 (or None when tokens are merges rather than patches), the others standing for
    no single patch (VisionTrace.first)."""
    batch = hidden.shape[0]
    if kept is None:  # merged tokens: report no patch as kept verbatim
        kept = torch.empty(batch, 0, dtype=torch.long, device=hidden.device)
    trace = VisionTrace(counts=counts, kept=kept, first=first)
    cls = final_cls(tower, hidden, used) if want_final_cls else None
    return VisionOutput(hidden[:, 1:], hidden[:, CLS_INDEX], cls, trace)
