"""Model presets and loading: llava-hf checkpoints (local path or hub id in the user's cache) and random-weight
architectures for work that needs no weights (FLOPs, latency, tests).

Presets:
- ``tiny-random`` (``tiny-random-next``: the same towers as a LLaVA-NeXT): LLaVA-1.5's token geometry (336 px, patch 14, 576 patches, feature layer -2) with a narrow
  8-layer CLIP tower and a narrow 32-layer Llama (as deep as Vicuna-7B); seconds on a CPU. Deterministic (seeded).
- ``llava-1.5-7b`` / ``llava-1.5-13b``: the llava-hf checkpoints; with ``random_weights=True`` the same
  architectures with random weights, built directly on the target device.
- ``llava-1.6-7b`` / ``llava-1.6-13b``: llava-hf's LLaVA-NeXT (Vicuna) checkpoints, AnyRes over LLaVA-1.6's grids;
  ``cpu-mid-next``: cpu-mid's towers as a LLaVA-NeXT, for `ivtp bench` on a CPU.
- ``testbed``: the trained miniature LLaVA shipped in ivtp/assets/testbed (docs/testbed.md), with its aligner.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
)

logger = logging.getLogger(__name__)

from ivtp.errors import InputError
from ivtp.names import ALIGNER_META, DTYPE_NAMES, MODEL_ALIASES, PRESET_NAMES, TESTBED_MODEL, TINY_TOKENIZER

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Preset:
    hub_id: str | None  # where the real weights live (None: random only)
    vision: dict
    text: dict
    next: bool = False  # LLaVA-NeXT (AnyRes crops, LlavaNextForConditionalGeneration), else LLaVA-1.5


_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4, image_size=336,
                    patch_size=14, projection_dim=32, hidden_act="quick_gelu")
_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5)
_CPU_MID_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=8,
                       image_size=336, patch_size=14, projection_dim=256, hidden_act="quick_gelu")
_CPU_MID_TEXT = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                     num_key_value_heads=12, max_position_embeddings=4096, rms_norm_eps=1e-5)
_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064)
_VICUNA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                   num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064)
PRESETS = {
    "tiny-random": Preset(hub_id=None, vision=_TINY_VISION, text=_TINY_TEXT),
    # For `ivtp bench` on a CPU: LLaVA-1.5's token geometry (576 patches, 24 CLIP layers, feature layer -2)
    # with a narrower tower and a narrower, shallower LLM, so one pruned-vs-unpruned run takes minutes.
    "cpu-mid": Preset(hub_id=None, vision=_CPU_MID_VISION, text=_CPU_MID_TEXT),
    "llava-1.5-7b": Preset(hub_id="llava-hf/llava-1.5-7b-hf", vision=_CLIP_L_336, text=_VICUNA_7B),
    "llava-1.5-13b": Preset(hub_id="llava-hf/llava-1.5-13b-hf", vision=_CLIP_L_336, text=_VICUNA_13B),
    # LLaVA-NeXT: the same towers, AnyRes over LLaVA-1.6's grids (up to 5 crops of 576 patches per image).
    "tiny-random-next": Preset(hub_id=None, vision=_TINY_VISION, text=_TINY_TEXT, next=True),
    "cpu-mid-next": Preset(hub_id=None, vision=_CPU_MID_VISION, text=_CPU_MID_TEXT, next=True),
    "llava-1.6-7b": Preset(hub_id="llava-hf/llava-v1.6-vicuna-7b-hf", vision=_CLIP_L_336, text=_VICUNA_7B, next=True),
    "llava-1.6-13b": Preset(hub_id="llava-hf/llava-v1.6-vicuna-13b-hf", vision=_CLIP_L_336, text=_VICUNA_13B,
                            next=True),
}


def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def llava_config(vision: dict, text: dict, tokenizer=None, **overrides) -> LlavaConfig:
    """A LlavaConfig in LLaVA-1.5's shape. Without `text['vocab_size']`, the vocabulary follows the tokenizer
    (padded to a multiple of 64, as llava-hf does)."""
    text = dict(text)
    image_token_id, pad_id = 32000, 32001
    if tokenizer is not None:
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        pad_id = tokenizer.pad_token_id
        text.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
    text_config = LlamaConfig(pad_token_id=pad_id, **text)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=text_config, image_token_id=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False, **overrides,
    )


def build_processor(tokenizer, image_size: int, patch_size: int) -> LlavaProcessor:
    """A LLaVA-1.5 processor: CLIP resize + centre crop to `image_size`, one placeholder per patch."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def tiny_random(seed: int = 0, **vision_overrides) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The tiny-random preset (deterministic). `vision_overrides` let tests shrink the image, e.g. image_size=112."""
    preset = PRESETS["tiny-random"]
    tok = tiny_tokenizer()
    vision = {**preset.vision, **vision_overrides}
    config = llava_config(vision, preset.text, tok)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, build_processor(tok, vision["image_size"], vision["patch_size"])


# LLaVA-1.6's AnyRes grids, in crops (rows, cols): the llava-hf checkpoints' image_grid_pinpoints over 336 px.
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def llava_next_config(vision: dict, text: dict, tokenizer=None, image_grid_pinpoints=None,
                      **overrides) -> LlavaNextConfig:
    """A LlavaNextConfig in LLaVA-1.6's shape: llava_config's towers, with LLaVA-1.6's grids at the tower's size
    (or the (height, width) grids given)."""
    base = llava_config(vision, text, tokenizer)
    size = base.vision_config.image_size
    grids = image_grid_pinpoints or [[rows * size, cols * size] for rows, cols in NEXT_GRIDS]
    return LlavaNextConfig(
        vision_config=base.vision_config, text_config=base.text_config, image_token_id=base.image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=grids, tie_word_embeddings=False, **overrides,
    )


def build_next_processor(tokenizer, config: LlavaNextConfig) -> LlavaNextProcessor:
    """A LLaVA-NeXT processor for `config`: the base view and the tiles of the best grid, one placeholder per token
    of the stock layout (base, unpadded tiles, newlines)."""
    size = config.vision_config.image_size
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=config.image_grid_pinpoints, size={"shortest_edge": size},
        crop_size={"height": size, "width": size}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              patch_size=config.vision_config.patch_size, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)


def tiny_random_next(seed: int = 0, **vision_overrides) -> tuple[LlavaNextForConditionalGeneration,
                                                                  LlavaNextProcessor]:
    """tiny-random's towers as a LLaVA-NeXT (deterministic); `vision_overrides` as for tiny_random."""
    preset = PRESETS["tiny-random"]
    tok = tiny_tokenizer()
    config = llava_next_config({**preset.vision, **vision_overrides}, preset.text, tok)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    return model, build_next_processor(tok, config)


def tiny_aligner(seed: int = 0, model: str = "ivtp-tiny-clip"):
    """An aligner for a random-weight preset: open_clip's text tower in a small shipped config whose visual
    projection matches the preset's tower (tiny-random: 32 wide; cpu-mid: 256), with seeded random weights."""
    import warnings

    from ivtp.aligner import Aligner
    from ivtp.config import AlignerConfig

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # random on purpose here; from_config warns for user configs
        warnings.simplefilter("ignore")
        return Aligner.from_config(AlignerConfig(model=model, pretrained=None)).eval()


PRESET_ALIGNERS = {"tiny-random": "ivtp-tiny-clip", "cpu-mid": "ivtp-cpu-mid-clip", "tiny-random-next": "ivtp-tiny-clip",
                   "cpu-mid-next": "ivtp-cpu-mid-clip"}


def preset_aligner(name: str):
    """The aligner a preset or checkpoint folder brings along, or None when the prune config's own
    `llm.aligner` applies."""
    if name in PRESET_ALIGNERS:
        return tiny_aligner(model=PRESET_ALIGNERS[name])
    from ivtp.aligner import Aligner

    folder = TESTBED_MODEL if name == "testbed" else name
    return Aligner.from_pretrained(folder) if os.path.isfile(os.path.join(folder, ALIGNER_META)) else None


def random_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa", seed: int = 0):
    """A preset's architecture with random weights, built on `device`. The processor uses the tiny tokenizer
    (its ids are valid in any vocabulary), which is all latency and FLOPs work needs."""
    if name == "tiny-random":
        model, processor = tiny_random(seed)
        model.set_attn_implementation(attn_implementation)
        return model.to(device=device, dtype=dtype), processor
    tok = tiny_tokenizer()
    config = preset_config(name, tok)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = MODEL_CLASSES[config.model_type]._from_config(config, dtype=dtype).eval()
    return model, preset_processor(tok, config)


def preset_processor(tokenizer, config):
    """The processor of a preset's config: LLaVA-1.5's (one fixed placeholder run) or LLaVA-NeXT's (AnyRes)."""
    if isinstance(config, LlavaNextConfig):
        return build_next_processor(tokenizer, config)
    return build_processor(tokenizer, config.vision_config.image_size, config.vision_config.patch_size)


def preset_config(name: str, tokenizer=None, vocab_size: int | None = None) -> LlavaConfig | LlavaNextConfig:
    """A preset's config as `random_model` builds it (the tiny tokenizer's special ids index the real
    vocabulary, so the config points at them). vocab_size: instead of the preset's (or the tokenizer's) own, e.g.
    the real checkpoints' 32064 to price a small preset's LM head as theirs (`ivtp flops`)."""
    preset = _preset(name)
    tok = tokenizer or tiny_tokenizer()
    text = preset.text if vocab_size is None else {**preset.text, "vocab_size": vocab_size}
    build = llava_next_config if preset.next else llava_config
    config = build(preset.vision, text, None if "vocab_size" in text else tok)
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    return config


def architecture(name: str, random_weights: bool = False, cache_dir: str | None = None) -> LlavaConfig | None:
    """The LlavaConfig `load_model(name)` will build, read without any weights (None for a hub id that is not
    cached yet): budget checks run on it before the weights load."""
    source = resolve_source(name, random_weights, cache_dir)
    if source in PRESETS:
        return preset_config(source)
    return _local_config(source, cache_dir)


def _local_config(source: str, cache_dir: str | None = None):
    """The config.json of a folder or cached hub id, read without weights or network (None when not at hand)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, cache_dir=cache_dir)
    except (OSError, ValueError):
        return None


def check_fits(config, name: str, random_weights: bool = False, compile=None) -> None:
    """Budgets `name`'s geometry cannot meet, and a method that cannot compile when `compile` asks for it, fail
    here, from its config.json, before any weights load (a name whose config is not at hand yet is checked by
    apply_pruning instead)."""
    arch = architecture(name, random_weights)
    if arch is not None:
        from ivtp.compiled import check_compilable
        from ivtp.config import PruneConfig
        from ivtp.patch.llava import make_plans

        config = PruneConfig.load(config)
        _, llm_plan = make_plans(config, arch)
        if compile:
            check_compilable(config, llm_plan)


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# The llava-hf classes the package prunes (apply_pruning), by config.json's model_type.
MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


def model_class(source: str, cache_dir: str | None = None):
    """The transformers class of a llava-hf checkpoint (folder or cached hub id), from its config.json's model_type;
    LLaVA-1.5's when the config is not at hand yet (a hub id to download)."""
    config = _local_config(source, cache_dir)
    return MODEL_CLASSES.get(getattr(config, "model_type", None), LlavaForConditionalGeneration)


def load_model(
    name_or_path: str,
    random_weights: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    cache_dir: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load (model, processor) from a preset name, a local llava-hf folder, or a hub id in the user's cache
    (`cache_dir`, default the HF cache)."""
    source = resolve_source(name_or_path, random_weights, cache_dir)  # a bad name fails here, in one line
    if source in PRESETS and PRESETS[source].hub_id is None:  # random weights only (tiny-random, cpu-mid, ...)
        return random_model(source, dtype=dtype or torch.float32, device=device,
                            attn_implementation=attn_implementation or "sdpa")
    if name_or_path == "testbed":
        dtype = dtype or torch.float32  # shipped in fp16, run in fp32 on a CPU
    if random_weights:
        return random_model(name_or_path, dtype=dtype or torch.bfloat16, device=device,
                            attn_implementation=attn_implementation or "sdpa")
    kwargs = dict(dtype=dtype or "auto")
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    from ivtp.projectors import load_with_projector, match_processor, projector_spec

    # A checkpoint trained with a compressor in place of the projector (config.json records it, ivtp.projectors)
    # gets it back with its weights, and a processor that writes its placeholder count.
    model = load_with_projector(
        lambda **extra: _from_local_or_cache(model_class(source, cache_dir), source, cache_dir, **kwargs, **extra),
        source, cache_dir).to(device).eval()
    processor = _from_local_or_cache(AutoProcessor, source, cache_dir)
    if projector_spec(model.config) is not None:
        match_processor(processor, model.config)
    return model, processor


class ModelNotFoundError(InputError):
    """--model names no preset, no llava-hf folder and no hub id in the cache."""


def resolve_source(name: str, random_weights: bool = False, cache_dir: str | None = None) -> str:
    """Where `name`'s weights come from (a folder or a hub id), checked without loading anything: a preset, the
    testbed, a llava-hf folder with weights, or a hub id in the HF cache (or, online, one to download). Raises
    ModelNotFoundError (one line) for anything else, with the presets listed and the closest one suggested."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if name == "testbed":
        if not os.path.isfile(os.path.join(TESTBED_MODEL, "config.json")):
            raise ModelNotFoundError(f"the testbed model is not in {TESTBED_MODEL}; build it with `make testbed`")
        return TESTBED_MODEL
    if name in PRESETS:
        hub_id = PRESETS[name].hub_id
        if random_weights or hub_id is None:
            return name
        if offline and not _in_hf_cache(hub_id, cache_dir):
            raise ModelNotFoundError(f"preset {name}: its weights ({hub_id}) are not in the HF cache and "
                                     "HF_HUB_OFFLINE=1; download them on a connected machine, or pass "
                                     "--random-weights for the architecture alone")
        return hub_id
    if random_weights:
        raise ModelNotFoundError(f"--random-weights builds a preset's architecture; {name!r} is not a preset "
                                 f"({', '.join(PRESET_NAMES)})")
    if os.path.isdir(name):
        check_llava_folder(name)
        return name
    if _in_hf_cache(name, cache_dir) or _is_hub_id(name) and not offline:
        return name  # cached, or one a connected machine may download (_from_local_or_cache says if not)
    import difflib

    names = [*PRESET_NAMES, *MODEL_ALIASES]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ModelNotFoundError(f"model {name!r} is neither a preset ({', '.join(names)}), nor a local llava-hf "
                             f"folder, nor a hub id in the HF cache{hint}")


def _is_hub_id(name: str) -> bool:
    """'org/name' as the hub spells it; a relative or absolute folder path is not one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") != 1 or os.path.isdir(name.split("/")[0]):
        return False  # a folder path (its parent exists here), not a hub id
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _in_hf_cache(repo_id: str, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return _is_hub_id(repo_id) and isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir),
                                              str)


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_prune_config(prune_config=None, method: str | None = None, model: str | None = None):
    """The PruneConfig of a run, parsed before any model loads (a bad key costs no loading time).

    prune_config: 'none' (unpruned), a YAML/JSON path, a checkpoint folder, or None. method: a method at its
    defaults (or a check against the config's method). With neither, the config saved beside the model's weights
    (ivtp_config.json: a retrained checkpoint carries its own) or else PruneConfig(), the paper's setting.
    """
    from ivtp.config import CONFIG_NAME, ConfigError, PruneConfig

    if prune_config == "none":
        return None
    if prune_config is None and method is None and model is not None:
        folder = TESTBED_MODEL if model == "testbed" else model
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            return PruneConfig.from_pretrained(folder)
        if _has_compressor(model):  # trained with a compressor (ivtp.projectors): it sets the visual tokens
            return None
    config = PruneConfig.load(prune_config)
    if method is not None:
        if prune_config is not None and config.method != method:
            raise ConfigError(f"--method {method} disagrees with method {config.method!r} of {prune_config}")
        config = PruneConfig.for_method(method) if prune_config is None else config
    return config


def _has_compressor(name: str) -> bool:
    """Whether `name`'s config.json records a trained compressor in place of the projector (read without weights;
    False for a name whose config is not at hand)."""
    if name in PRESETS:
        return False
    try:
        arch = architecture(name)
    except InputError:
        return False  # a bad name is load_model's to report
    return getattr(arch, "ivtp_projector", None) is not None


def load_for_inference(name: str, config=None, *, random_weights: bool = False, dtype: "str | torch.dtype | None" = None,
                       device: str | torch.device = "cpu", attn_implementation: str | None = None, compile=None):
    """(model, processor) ready for generation: loaded as `load_model` does, then pruned in place with `config`
    (None: unpruned) and the aligner the preset or checkpoint folder brings, if any. `compile`: the pruned
    prefill as one compiled graph (ivtp.compiled; apply_pruning's argument)."""
    from ivtp import apply_pruning

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r}: choose one of {', '.join(sorted(DTYPES))}")
        dtype = DTYPES[dtype]
    if compile and config is None:
        raise InputError("--compile compiles the pruned prefill: give a method or a prune config (the unpruned "
                         "model runs as transformers runs it; `ivtp bench --compile` compiles both to compare)")
    if config is not None:
        check_fits(config, name, random_weights, compile)
    model, processor = load_model(name, random_weights=random_weights, dtype=dtype, device=device,
                                  attn_implementation=attn_implementation)
    if config is not None:
        apply_pruning(model, config, aligner=preset_aligner(name), tokenizer=processor.tokenizer, compile=compile)
    return model.eval(), processor


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # what transformers' from_pretrained reads, in its order


def check_llava_folder(path: str) -> None:
    """A llava-hf checkpoint folder: config.json in the llava layout, and weights. Raises ModelNotFoundError."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):  # transformers would fetch a base from the hub
            merged = os.path.join(path, "merged")
            hint = (f"load {merged}, the merged model train/finetune.py wrote beside them" if os.path.isdir(merged)
                    else "merge them into their base model first (peft's merge_and_unload)")
            raise ModelNotFoundError(f"{path} holds LoRA adapters, not a llava-hf model: {hint}")
        raise ModelNotFoundError(f"{path} has no config.json: not a llava-hf checkpoint folder")
    import json

    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelNotFoundError(f"{path}/config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in MODEL_CLASSES or "vision_config" not in cfg:
        raise ModelNotFoundError(
            f"{path} is not in the llava-hf layout (model_type {cfg.get('model_type')!r}). An original LLaVA-1.5 "
            "checkpoint (LlavaLlamaForCausalLM, mm_projector) converts with `ivtp convert`."
        )
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
        raise ModelNotFoundError(f"{path} has config.json but no weights ({', '.join(WEIGHT_FILES)}): an "
                                 "interrupted save, or a checkpoint whose weights were left out")


def _from_local_or_cache(cls, source: str, cache_dir: str | None, **kwargs):
    """Prefer what is on disk (local folder or HF cache); only then ask the hub, with an error that says so."""
    kwargs["cache_dir"] = cache_dir
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as local_error:
        if os.path.isdir(source) or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
        try:
            return cls.from_pretrained(source, **kwargs)
        except OSError as hub_error:
            raise ModelNotFoundError(
                f"could not load {source!r}: not in the local HF cache ({local_error.__class__.__name__}) and the "
                f"hub could not be reached ({str(hub_error).splitlines()[0]}). Download it on a connected machine or "
                "pass a local path."
            ) from None
