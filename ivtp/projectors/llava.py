"""A trained compressor in a transformers `LlavaForConditionalGeneration`, in place of its projector.

What changes:
- `model.model.multi_modal_projector` becomes the compressor. The stock `get_image_features` calls it on the
  layer -2 patches and hands its (B, tokens_per_image, D) output on; the stock placeholder check then asks for
  tokens_per_image `<image>` tokens per image, and the processor is set to write that many (`match_processor`).
- `model.config.ivtp_projector` records the choice ({name, num_tokens, tokens_per_image, options}); it is saved in
  config.json with the weights, and `restore_projector` rebuilds the compressor from it after `from_pretrained`
  (which builds the stock projector, reports the compressor's weights as unexpected, and drops them) and loads
  its weights from the checkpoint files.
- A compressor that reads the instruction (LLaMA-VID) also swaps the model's class for one whose forward gathers
  each image's instruction embeddings and whose generate bounds that instruction by the prompt (the class keeps
  its stock name, so config.json's "architectures" is unchanged).
"""

from __future__ import annotations

import json
import logging
import os

import torch
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ivtp.guidance import instruction_mask
from ivtp.ops.sequence import check_placeholders, placeholder_counts
from ivtp.patch.llava import _swap_class, num_patches
from ivtp.projectors import PROJECTORS, ProjectorError, build_projector, check_name

logger = logging.getLogger(__name__)
CONFIG_KEY = "ivtp_projector"  # the attribute of LlavaConfig (and key of config.json) that records the choice
# Where the projector's weights live: save_pretrained writes llava-hf's original layout (multi_modal_projector.*),
# the model's own state dict has them under model.*.
PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def projector_spec(config) -> dict | None:
    """The compressor a LlavaConfig records, or None for LLaVA's own projector."""
    return getattr(config, CONFIG_KEY, None)


def image_tokens(config) -> int:
    """Placeholders (LLM input tokens) per image: the compressor's output count, else one per patch."""
    spec = projector_spec(config)
    return num_patches(config) if spec is None else int(spec["tokens_per_image"])


def attach_projector(model: LlavaForConditionalGeneration, name: str, num_tokens: int = 64, processor=None,
                     **options) -> LlavaForConditionalGeneration:
    """Replace `model`'s projector by a fresh compressor `name` (honeybee, llama_vid, qwen_vl) with `num_tokens`
    tokens per image, in place, and return the model. With `processor`, its placeholder count follows.
    Refuses a model that already has a compressor or is pruned; every check runs before anything changes."""
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"attach_projector expects a transformers LlavaForConditionalGeneration, got "
                        f"{type(model).__name__}")
    if projector_spec(model.config) is not None or isinstance(model.model.multi_modal_projector,
                                                              tuple(PROJECTORS.values())):
        raise RuntimeError("attach_projector was already applied to this model; load a fresh model to change it")
    if hasattr(model, "ivtp_state"):
        raise RuntimeError("this model is pruned (apply_pruning); attach a projector before, to a fresh model")
    check_name(name)
    _check_features(model.config)
    _install(model, {"name": name, "num_tokens": num_tokens, "options": dict(options)})
    if processor is not None:
        match_processor(processor, model.config)
    return model


def _check_features(config) -> None:
    """The compressors read the patch grid: one feature layer, [CLS] dropped (LLaVA-1.5's 'default')."""
    if not isinstance(config.vision_feature_layer, int):
        raise ProjectorError(f"multi-layer vision features ({config.vision_feature_layer}) are not supported")
    if config.vision_feature_select_strategy != "default":
        raise ProjectorError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}: the "
                             "compressors read the patch grid without [CLS] ('default')")


def _install(model, spec: dict) -> None:
    """Build the compressor `spec` names, on the device and in the dtype of the projector it replaces."""
    mc = model.config
    module = build_projector(spec["name"], mc.vision_config.hidden_size, mc.text_config.hidden_size,
                             spec["num_tokens"], num_patches(mc), **spec.get("options", {}))
    old = next(model.model.multi_modal_projector.parameters(), None)
    if old is not None:
        module.to(device=old.device, dtype=old.dtype)
    model.model.multi_modal_projector = module
    setattr(mc, CONFIG_KEY, {"name": spec["name"], "num_tokens": spec["num_tokens"],
                             "tokens_per_image": module.tokens_per_image, "options": dict(spec.get("options", {}))})
    if module.text_conditioned:
        _swap_class(model, TextConditionedLlava)


def match_processor(processor, config) -> None:
    """Make a LlavaProcessor write image_tokens(config) placeholders per image.

    The processor writes (H/patch)(W/patch) + num_additional_image_tokens placeholders, less one under the
    'default' strategy. Setting the additional count (negative for a compressor) changes nothing else, and it is
    saved in processor_config.json, so the folder's processor loads back right with a plain AutoProcessor."""
    extra = 1 if processor.vision_feature_select_strategy == "default" else 0
    processor.num_additional_image_tokens = image_tokens(config) - num_patches(config) + extra


# ---- loading ---------------------------------------------------------------------------------------------------
def load_with_projector(load, source: str, cache_dir: str | None = None):
    """`load(**extra)` calls LlavaForConditionalGeneration.from_pretrained(source, ...); the model it returns gets
    back the compressor its config records (`restore_projector`). from_pretrained builds the stock projector, so
    for such a checkpoint it finds that projector's weights missing and the compressor's unexpected, by design: its
    load report is then silenced, and any other missing or unexpected key is still reported."""
    if _recorded_spec(source, cache_dir) is None:
        model = load()
    else:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = load(output_loading_info=True)
        finally:
            hf_logging.set_verbosity(level)
        stray = [k for k in (*info["missing_keys"], *info["unexpected_keys"]) if not k.startswith(PREFIXES)]
        if stray:
            logger.warning("%s: keys outside the projector are missing or unexpected: %s", source, stray[:8])
    return restore_projector(model, source, cache_dir)


def _recorded_spec(source: str, cache_dir: str | None) -> dict | None:
    """The compressor `source`'s config.json records, read before any weights (None when it is not at hand)."""
    path = _checkpoint_file(source, "config.json", cache_dir)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f).get(CONFIG_KEY)


def restore_projector(model, source: str, cache_dir: str | None = None):
    """After `LlavaForConditionalGeneration.from_pretrained(source)`: the compressor its config records, with its
    weights from `source` (a folder or a cached hub id). A model without one is returned as it is."""
    spec = projector_spec(model.config)
    if spec is None or isinstance(model.model.multi_modal_projector, tuple(PROJECTORS.values())):
        return model
    state = _read_prefixed(source, cache_dir)
    _install(model, spec)
    module = model.model.multi_modal_projector
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ProjectorError(f"{source}: the {spec['name']} projector's weights do not fit (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _read_prefixed(source: str, cache_dir: str | None) -> dict[str, torch.Tensor]:
    """The projector's tensors in a checkpoint's safetensors or .bin files (sharded or not), prefix removed."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        index_path = _checkpoint_file(source, index, cache_dir)
        if index_path is not None:
            with open(index_path) as f:
                shards = sorted({v for k, v in json.load(f)["weight_map"].items() if k.startswith(PREFIXES)})
            files = [_checkpoint_file(source, s, cache_dir) for s in shards]
        else:
            files = [p for p in [_checkpoint_file(source, single, cache_dir)] if p is not None]
        if files:
            state: dict[str, torch.Tensor] = {}
            for path in files:
                for key, value in _load_file(path).items():
                    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
                    if prefix is not None:
                        state[key[len(prefix):]] = value
            return state
    raise ProjectorError(f"{source}: no weights found for its projector ({PREFIXES[0]}*)")


def _checkpoint_file(source: str, name: str, cache_dir: str | None) -> str | None:
    if os.path.isdir(source):
        path = os.path.join(source, name)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    try:  # a hub id: only what the cache holds (from_pretrained fetched it, or will say why not)
        return cached_file(source, name, cache_dir=cache_dir, local_files_only=True,
                           _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None


def _load_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- the instruction-reading model -----------------------------------------------------------------------------
class TextConditionedLlava:
    """Mixin for LlavaForConditionalGeneration whose projector reads each image's instruction (LLaMA-VID)."""

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, ivtp_prompt_len=None, **kwargs):
        """The stock forward with the image features computed here, from the tower's patches and each image's
        instruction (the row's text after its last image, before the answer and before `ivtp_prompt_len`), and
        handed in as mm_encoder_outputs. Without input_ids the instruction is unknown: the stock path runs and
        the projector sees no text."""
        if pixel_values is not None and input_ids is not None:
            features = conditioned_image_features(self, input_ids, pixel_values, attention_mask,
                                                  kwargs.get("labels"), ivtp_prompt_len)
            kwargs["mm_encoder_outputs"] = {"image": features}
            pixel_values = None
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               position_ids=position_ids, past_key_values=past_key_values,
                               inputs_embeds=inputs_embeds, **kwargs)

    def generate(self, inputs=None, **kwargs):
        """Stock generate; every forward it makes is told where the prompt ends, so that a forward that recomputes
        the whole sequence (no cache) reads the same instruction as the prefill."""
        input_ids = kwargs.get("input_ids", inputs)
        if input_ids is not None:
            kwargs.setdefault("ivtp_prompt_len", input_ids.shape[1])
        return super().generate(inputs, **kwargs)


def tower_patches_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(n_img, 3, H, W) -> (n_img, N, Dv): the feature layer's patch tokens, as the stock get_image_features
    selects them (its projector input)."""
    config = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return out.hidden_states[config.vision_feature_layer][:, 1:]


def conditioned_image_features(model, input_ids, pixel_values, attention_mask, labels, prompt_len):
    """What get_image_features returns, with the projector given each image's instruction embeddings."""
    per_image = image_tokens(model.config)
    counts = placeholder_counts(input_ids, model.config.image_token_id)  # (B,)
    check_placeholders(counts, pixel_values.shape[0], per_image)
    features = tower_patches_features(model, pixel_values)  # (n_img, N, Dv)
    instr = instruction_mask(input_ids == model.config.image_token_id, attention_mask, labels, prompt_len)  # (B, L)
    text, text_mask = pack_rows(model.get_input_embeddings()(input_ids), instr)  # (B, T, Dt), (B, T)
    row = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts // per_image)  # (n_img,)
    projected = model.model.multi_modal_projector(features, text[row], text_mask[row])  # (n_img, K, Dl)
    return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=list(projected))


def pack_rows(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept positions, in order, moved to the front: (B, L, D), (B, L) bool -> (B, T, D) and its
    (B, T) mask, T the most any row keeps (0 when none does)."""
    counts = keep.sum(1)  # (B,)
    width = int(counts.max()) if keep.numel() else 0
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # (B, T): kept ones first
    packed = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))  # (B, T, D)
    return packed, torch.arange(width, device=x.device)[None] < counts[:, None]
