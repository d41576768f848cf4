"""`apply_pruning`: turn a stock `transformers.LlavaForConditionalGeneration` into a pruned one, in place.

What changes (class swaps that override methods only; no weight, buffer or state_dict key changes):
- every CLIPAttention of the vision tower gains the GTP probe (ivtp/patch/clip.py);
- `LlavaModel.get_image_features` runs the tower with stage-1 pruning and projects the kept patches;
- `LlavaForConditionalGeneration.forward` and `.generate` shrink each image's `<image>` run in input_ids (and the
  attention mask and labels) to the number of tokens stage 1 hands on, before the stock code checks that
  placeholders and features match. Everything after that is the stock model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ivtp.config import ConfigError, PruneConfig
from ivtp.ops.sequence import (
    PlaceholderError,
    ShrunkBatch,
    check_placeholders,
    infer_padding_side,
    placeholder_counts,
    shrink_placeholders,
)
from ivtp.patch.clip import VisionPlan, VisionTrace, make_vision_plan, patch_attention, prune_vision_tower

logger = logging.getLogger(__name__)


# ---- the one place that knows where things live in a transformers 5.x LLaVA ---------------------------------
def vision_tower(model: LlavaForConditionalGeneration):
    return model.model.vision_tower


def vision_layers(model: LlavaForConditionalGeneration):
    return model.model.vision_tower.encoder.layers


def num_patches(config) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def pad_token_id(config) -> int:
    for cfg in (config, config.text_config):
        pid = getattr(cfg, "pad_token_id", None)
        if pid is not None:
            return int(pid)
    return 0


# ---- state carried by a pruned model ---------------------------------------------------------------------------
@dataclass
class PruningState:
    config: PruneConfig
    num_patches: int
    image_token_id: int
    pad_token_id: int
    vision_plan: VisionPlan | None
    last_trace: VisionTrace | None = None

    @property
    def tokens_per_image(self) -> int:
        """Tokens each image contributes to the LLM input."""
        return self.vision_plan.keep if self.vision_plan is not None else self.num_patches

    def step_names(self) -> list[str]:
        return ["input"] + (self.vision_plan.step_names() if self.vision_plan is not None else [])

    def shrink(
        self,
        input_ids: torch.Tensor,
        num_images: int,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        padding_side: str,
    ) -> ShrunkBatch:
        """Check the placeholders against the images, then shrink each image's run to `tokens_per_image`."""
        check_placeholders(placeholder_counts(input_ids, self.image_token_id), num_images, self.num_patches)
        return shrink_placeholders(
            input_ids, self.image_token_id, self.num_patches, self.tokens_per_image,
            attention_mask=attention_mask, labels=labels, pad_token_id=self.pad_token_id, padding_side=padding_side,
        )

    def check_shrunk(self, input_ids: torch.Tensor, num_images: int) -> None:
        """Input that `shrink` already produced (generate's later calls) must hold the shrunk runs."""
        check_placeholders(placeholder_counts(input_ids, self.image_token_id), num_images, self.tokens_per_image)

    def check_no_placeholders(self, input_ids: torch.Tensor) -> None:
        counts = placeholder_counts(input_ids, self.image_token_id)
        if bool(counts.any()):
            raise PlaceholderError(
                f"the prompt holds <image> placeholders (per row: {counts.tolist()}) but no pixel_values were given"
            )


# ---- the swapped-in classes ---------------------------------------------------------------------------------------
class PrunedLlavaModel:
    """Mixin for LlavaModel: stage-1 pruned image features."""

    ivtp_state: PruningState

    def get_image_features(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None,
        **kwargs,
    ):
        _check_feature_args(self.config, vision_feature_layer, vision_feature_select_strategy, image_sizes)
        state = self.ivtp_state
        if state.vision_plan is None:  # stage 1 off: the stock path, traced as "nothing pruned"
            out = super().get_image_features(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                                             vision_feature_select_strategy=vision_feature_select_strategy, **kwargs)
            n_img = pixel_values.shape[0]
            kept = torch.arange(state.num_patches, device=pixel_values.device).expand(n_img, -1)
            state.last_trace = VisionTrace(counts=[state.num_patches], kept=kept)
            return out
        features, trace = prune_vision_tower(self.vision_tower, pixel_values, state.vision_plan)  # (B, K, Dv)
        image_features = self.multi_modal_projector(features)  # (B, K, D)
        state.last_trace = trace
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=list(image_features))


class PrunedLlavaForConditionalGeneration:
    """Mixin for LlavaForConditionalGeneration: shrink placeholder runs before the stock forward/generate."""

    ivtp_state: PruningState

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, ivtp_shrunk: bool = False, **kwargs):
        """The stock forward, on input_ids whose <image> runs hold one placeholder per patch (as the processor
        writes them); they are shrunk to the tokens stage 1 keeps. `ivtp_shrunk=True` says they already are."""
        state = self.ivtp_state
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError(
                    "a pruned LLaVA needs input_ids with pixel_values: the <image> runs are shrunk in input_ids"
                )
            if ivtp_shrunk:
                state.check_shrunk(input_ids, pixel_values.shape[0])
            else:
                shrunk = state.shrink(input_ids, pixel_values.shape[0], attention_mask, kwargs.get("labels"),
                                      padding_side=infer_padding_side(attention_mask, default="right"))
                if shrunk.keep is not None:
                    input_ids, attention_mask = shrunk.input_ids, shrunk.attention_mask
                    if kwargs.get("labels") is not None:
                        kwargs["labels"] = shrunk.labels
                    if position_ids is not None:  # given for the full-length sequence: rebuild for the shrunk one
                        position_ids = None if attention_mask is None else _positions_from_mask(attention_mask)
        elif input_ids is not None and _is_prefill(past_key_values):
            state.check_no_placeholders(input_ids)
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs,
        )

    def generate(self, inputs=None, ivtp_shrunk: bool = False, **kwargs):
        """Stock generate, after shrinking the prompt's <image> runs once (unless `ivtp_shrunk`); every forward
        it makes is told so. The returned sequences start with the shrunk prompt."""
        input_ids = kwargs.pop("input_ids", inputs)
        pixel_values = kwargs.get("pixel_values")
        state = self.ivtp_state
        if input_ids is not None and pixel_values is not None:
            if ivtp_shrunk:
                state.check_shrunk(input_ids, pixel_values.shape[0])
            else:
                attention_mask = kwargs.get("attention_mask")
                shrunk = state.shrink(input_ids, pixel_values.shape[0], attention_mask, None,
                                      padding_side=infer_padding_side(attention_mask, default="left"))
                input_ids = shrunk.input_ids
                if shrunk.attention_mask is not None:
                    kwargs["attention_mask"] = shrunk.attention_mask
        elif input_ids is not None:
            state.check_no_placeholders(input_ids)
        return super().generate(input_ids, ivtp_shrunk=True, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Weights in the llava-hf layout, with ivtp_config.json beside them."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.ivtp_state.config.save_pretrained(save_directory)
        return out


def _positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _is_prefill(past_key_values) -> bool:
    return past_key_values is None or past_key_values.get_seq_length() == 0


def _check_feature_args(config, layer, strategy, image_sizes) -> None:
    if layer is not None and layer != config.vision_feature_layer:
        raise ValueError(
            f"this model was pruned for vision_feature_layer={config.vision_feature_layer}; got {layer} in the call"
        )
    if strategy is not None and strategy != config.vision_feature_select_strategy:
        raise ValueError(
            f"this model was pruned for vision_feature_select_strategy={config.vision_feature_select_strategy!r}; "
            f"got {strategy!r} in the call"
        )
    if image_sizes is not None:
        raise ValueError("image_sizes (any-resolution inputs) are not supported: LLaVA-1.5 uses one fixed size")


def _swap_class(module: torch.nn.Module, mixin: type) -> None:
    base = module.__class__
    # Keep the stock class name: save_pretrained writes it into config.json "architectures".
    module.__class__ = type(base.__name__, (mixin, base), {"__module__": mixin.__module__})


def apply_pruning(model: LlavaForConditionalGeneration, config=None, aligner=None) -> LlavaForConditionalGeneration:
    """Apply a prune config to a LLaVA model in place and return it.

    `config` is a PruneConfig, a dict, a YAML/JSON path or a checkpoint folder holding ivtp_config.json.
    Refuses a model that is already pruned. `aligner` is reserved for the in-LLM stage.
    """
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"apply_pruning expects a transformers LlavaForConditionalGeneration, got {type(model).__name__}")
    if isinstance(model, PrunedLlavaForConditionalGeneration) or hasattr(model, "ivtp_state"):
        raise RuntimeError("apply_pruning was already applied to this model; load a fresh model to change the config")
    cfg = PruneConfig.load(config)
    mc = model.config
    if not isinstance(mc.vision_feature_layer, int):
        raise ConfigError(f"multi-layer vision features ({mc.vision_feature_layer}) are not supported")
    if mc.vision_feature_select_strategy != "default":
        raise ConfigError(
            f"vision_feature_select_strategy {mc.vision_feature_select_strategy!r} is not supported: LLaVA-1.5 "
            "drops [CLS] ('default'), and the budgets count patch tokens"
        )
    patches = num_patches(mc)
    plan = None
    if cfg.vision.enabled:
        layers = vision_layers(model)
        plan = make_vision_plan(cfg.vision, len(layers), mc.vision_feature_layer, patches)
        for layer in layers:
            patch_attention(layer.self_attn)
    state = PruningState(cfg, patches, int(mc.image_token_id), pad_token_id(mc), plan)
    _swap_class(model.model, PrunedLlavaModel)
    _swap_class(model, PrunedLlavaForConditionalGeneration)
    model.ivtp_state = state
    model.model.ivtp_state = state
    logger.info("IVTP pruning applied: %s", cfg.to_dict())
    return model


def load_pruned(path: str | os.PathLike, config=None, **load_kwargs) -> LlavaForConditionalGeneration:
    """Load a llava-hf checkpoint and apply the config saved beside it (or the one given)."""
    model = LlavaForConditionalGeneration.from_pretrained(path, **load_kwargs)
    if config is None and os.path.isfile(os.path.join(path, "ivtp_config.json")):
        config = path
    return apply_pruning(model, config)
