"""Convert an original LLaVA-1.5 or LLaVA-1.6 checkpoint (liuhaotian/llava-v1.5-7b, llava-v1.6-vicuna-7b layout)
to the llava-hf layout.

The original layout is a LlavaLlamaForCausalLM: ``model.*`` (the Llama), ``lm_head.weight`` and the projector as
``model.mm_projector.{0,2}``, with the CLIP tower named in ``mm_vision_tower`` and loaded separately. The llava-hf
layout adds ``<image>`` and ``<pad>`` to the tokenizer and pads the vocabulary to a multiple of 64; the new
embedding rows are the mean of the old ones (so the new ids start neutral rather than random).

A LLaVA-1.6 checkpoint (``image_aspect_ratio`` anyres, ``mm_patch_merge_type`` spatial_unpad) becomes a
LlavaNextForConditionalGeneration: its grids come from ``image_grid_pinpoints`` and ``model.image_newline`` keeps
its name. Only Llama-architecture LLMs (Vicuna) convert; 1.6's Mistral and Yi checkpoints are refused.

The tensors are renamed, never copied through a model instance, so a 13B conversion needs one copy of the
weights in memory. The result is checked key by key against the llava-hf model built for the new config.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

from ivtp.models import MODEL_CLASSES, build_next_processor, build_processor, llava_config, llava_next_config

PROJECTOR = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
             "model.mm_projector.2.": "model.multi_modal_projector.linear_2.",
             "model.image_newline": "model.image_newline"}  # LLaVA-1.6's learnt row separator
VISION_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower.")


def load_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """Every weight shard of a folder (*.safetensors preferred, else pytorch_model*.bin)."""
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    state: dict[str, torch.Tensor] = {}
    if shards:
        from safetensors.torch import load_file

        for shard in shards:
            state.update(load_file(shard))
        return state
    shards = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    for shard in shards:
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    return state


def convert_original_llava(src: str, out: str, clip: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Write a llava-hf checkpoint (weights, config, processor) for the original checkpoint in `src`.

    `clip` is the CLIP vision tower (local folder or hub id in the cache); by default the one the checkpoint's
    config names in ``mm_vision_tower``.
    """
    with open(os.path.join(src, "config.json")) as f:
        orig = json.load(f)
    if "mm_projector_type" not in orig and "mm_hidden_size" not in orig:
        raise ValueError(f"{src}/config.json has no mm_* keys: not an original LLaVA checkpoint")
    if orig.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError(f"projector {orig.get('mm_projector_type')!r} is not LLaVA-1.5's mlp2x_gelu")
    anyres = _is_anyres(orig)
    state = load_state_dict(src)
    if "model.mm_projector.0.weight" not in state:
        raise ValueError(f"{src} holds no projector weights (model.mm_projector.0/2): the aligner is missing")

    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    vocab = -(-len(tokenizer) // 64) * 64

    clip = clip or orig["mm_vision_tower"]
    vision_state = {k: v for k, v in state.items() if k.startswith(VISION_PREFIXES)}
    if vision_state:  # a checkpoint that trained its tower carries it
        vision_config = CLIPVisionConfig.from_pretrained(clip)
        vision_state = {_strip_prefix(k, VISION_PREFIXES): v for k, v in vision_state.items()}
    else:
        tower = CLIPVisionModel.from_pretrained(clip)
        vision_config, vision_state = tower.config, tower.state_dict()
    text = {k: orig[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "max_position_embeddings", "rms_norm_eps") if k in orig}
    text["num_key_value_heads"] = orig.get("num_key_value_heads", orig["num_attention_heads"])
    text["vocab_size"] = vocab
    text["rope_theta"] = orig.get("rope_theta", 10000.0)
    vision = {k: getattr(vision_config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "image_size", "patch_size",
                                                     "projection_dim", "hidden_act", "layer_norm_eps")}
    if anyres:  # LLaVA-1.6: its own grids, and its image_newline among the weights
        config = llava_next_config(vision, text, tokenizer, image_grid_pinpoints=orig["image_grid_pinpoints"])
    else:
        config = llava_config(vision, text, tokenizer)
    config.vision_feature_layer = orig.get("mm_vision_select_layer", -2)
    config.vision_feature_select_strategy = "default" if orig.get("mm_vision_select_feature", "patch") == "patch" \
        else "full"

    new_state: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(VISION_PREFIXES):
            continue
        new_state[_rename(key)] = value
    for key, value in vision_state.items():
        new_state["model.vision_tower." + key] = value
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        new_state[key] = _pad_rows(new_state[key], vocab)
    if dtype is not None:
        new_state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in new_state.items()}
    _check_keys(config, new_state)

    os.makedirs(out, exist_ok=True)
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict({k: v.contiguous() for k, v in new_state.items()}, out)
    config.architectures = [MODEL_CLASSES[config.model_type].__name__]
    config.save_pretrained(out)
    processor = (build_next_processor(tokenizer, config) if anyres
                 else build_processor(tokenizer, vision["image_size"], vision["patch_size"]))
    processor.save_pretrained(out)
    return out


def _is_anyres(orig: dict) -> bool:
    """Whether an original config is LLaVA-1.6's AnyRes; raises ValueError for what llava-hf cannot run."""
    if "anyres" not in str(orig.get("image_aspect_ratio", "")):
        return False
    merge = orig.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise ValueError(f"mm_patch_merge_type {merge!r}: llava-hf's LLaVA-NeXT implements spatial_unpad only")
    if "llama" not in str(orig.get("architectures", ["LlavaLlamaForCausalLM"])).lower():
        raise ValueError(f"{orig.get('architectures')}: only Llama-architecture LLMs (Vicuna) convert; the 1.6 "
                         "Mistral and Yi checkpoints have llava-hf conversions on the hub")
    if "image_grid_pinpoints" not in orig:
        raise ValueError("an anyres checkpoint without image_grid_pinpoints in its config.json")
    return True


def _strip_prefix(key: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def _rename(key: str) -> str:
    for old, new in PROJECTOR.items():
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key  # lm_head.weight


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad a (vocab, D) matrix to `rows` rows with the mean row."""
    if weight.shape[0] >= rows:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)


def _check_keys(config, state: dict[str, torch.Tensor]) -> None:
    """The renamed weights must be exactly the llava-hf model's, with the same shapes."""
    with torch.device("meta"):
        reference = MODEL_CLASSES[config.model_type](config).state_dict()
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise ValueError(f"conversion mismatch: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for key, tensor in reference.items():
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise ValueError(f"conversion mismatch: {key} has shape {tuple(state[key].shape)}, "
                             f"the llava-hf model expects {tuple(tensor.shape)}")
