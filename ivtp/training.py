"""The parts train/pretrain.py and train/finetune.py wire together: arguments, model assembly, what trains,
LoRA, the Trainer subclass and saving in the llava-hf layout with ivtp_config.json beside the weights.

The LLaVA-1.5 recipe (DESIGN.md section 7): pretraining trains the projector alone on the 558K captions with the
`plain` template; instruction tuning trains projector and LLM (vision tower frozen) on the 665K mix with
`vicuna_v1`. With `--prune-config`, pruning is active in the training forward (the paper's retraining mode).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import Trainer, TrainerCallback

from ivtp.config import PruneConfig
from ivtp.data.llava import Collator, LlavaDataset, ModalityLengthGroupedSampler, load_records, placeholders_per_image
from ivtp.data.templates import TEMPLATES

logger = logging.getLogger(__name__)
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="tiny-random", metadata={
        "help": "llava-hf folder, hub id in the cache, a preset (tiny-random), or with --vision_tower an LLM to "
                "assemble a new LLaVA from"})
    vision_tower: str | None = field(default=None, metadata={
        "help": "CLIP vision tower to assemble with the LLM (pretraining from parts), e.g. "
                "openai/clip-vit-large-patch14-336"})
    prune_config: str | None = field(default=None, metadata={"help": "prune config YAML: pruning in the forward"})
    tune: str = field(default="projector+llm", metadata={"help": "what trains: projector | projector+llm"})
    lora_enable: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    mm_projector_lr: float | None = field(default=None, metadata={"help": "learning rate of the projector"})
    projector: str | None = field(default=None, metadata={
        "help": "the projector: mlp (LLaVA's), or a trained compressor in its place: honeybee, llama_vid, qwen_vl "
                "(docs/methods.md). Default: the checkpoint's own, else mlp"})
    projector_tokens: int = field(default=64, metadata={"help": "visual tokens per image of a compressor"})


@dataclass
class DataArguments:
    data_path: str = field(default="data/fixtures/tiny_llava.json", metadata={"help": "LLaVA JSON"})
    image_folder: str | None = None
    template: str = field(default="vicuna_v1", metadata={"help": f"one of {', '.join(TEMPLATES)}"})
    image_aspect_ratio: str | None = field(default=None, metadata={
        "help": "pad or crop (LLaVA-1.5), anyres (LLaVA-NeXT); default: the model's own (pad, anyres)"})
    skip_missing: bool = field(default=False, metadata={"help": "skip samples whose image is missing"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = 2048
    group_by_modality_length: bool = False
    # The collator builds the model inputs itself; the Trainer must not drop the ones the pruned forward takes
    # through **kwargs (labels).
    remove_unused_columns: bool = False


def parse_args(argv=None, template: str = "vicuna_v1", tune: str = "projector+llm"):
    """HF-style arguments: every standard TrainingArguments flag passes through (and --local_rank, which the
    deepspeed launcher appends)."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.set_defaults(template=template, tune=tune)
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.template not in TEMPLATES:
        raise SystemExit(f"error: --template must be one of {', '.join(TEMPLATES)}")
    if model_args.tune not in ("projector", "projector+llm"):
        raise SystemExit("error: --tune must be 'projector' or 'projector+llm'")
    _check_projector_args(model_args)
    _reporting(train_args)
    return model_args, data_args, train_args


def _check_projector_args(args: ModelArguments) -> None:
    """A bad --projector, or one beside --prune-config, is a one-line error before anything loads."""
    from ivtp.names import PROJECTOR_NAMES
    from ivtp.projectors import ProjectorError

    if args.projector is not None and args.projector not in PROJECTOR_NAMES:
        raise ProjectorError(f"--projector {args.projector!r}: choose one of {', '.join(PROJECTOR_NAMES)}")
    if args.projector not in (None, "mlp") and args.prune_config:
        raise ProjectorError(f"--projector {args.projector} sets the visual tokens itself; it does not combine "
                             "with --prune-config")


def _reporting(args: TrainingArguments) -> None:
    """wandb runs offline when no key is set, so a missing login never stops a run."""
    if "wandb" in (args.report_to or []) and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")


# ---- the model -----------------------------------------------------------------------------------------------
def build_from_parts(llm_path: str, vision_path: str, dtype=None):
    """A new LLaVA-1.5 from an LLM (e.g. lmsys/vicuna-7b-v1.5) and a CLIP vision tower, with a fresh projector:
    the starting point of pretraining. <image> and <pad> join the tokenizer; new embedding rows are the mean."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

    from ivtp.convert import _pad_rows
    from ivtp.models import build_processor, llava_config

    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    llm = LlamaForCausalLM.from_pretrained(llm_path, dtype=dtype)
    tower = CLIPVisionModel.from_pretrained(vision_path, dtype=dtype)
    vc, tc = tower.config, llm.config
    vision = {k: getattr(vc, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "image_size", "patch_size", "projection_dim",
                                          "hidden_act", "layer_norm_eps")}
    text = {k: getattr(tc, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                        "rms_norm_eps")}
    config = llava_config(vision, text, tokenizer)
    model = LlavaForConditionalGeneration(config)
    vocab = config.text_config.vocab_size
    state = {f"model.language_model.{k[len('model.'):]}": v for k, v in llm.state_dict().items()
             if k.startswith("model.")}
    state["model.language_model.embed_tokens.weight"] = _pad_rows(llm.model.embed_tokens.weight.data, vocab)
    state["lm_head.weight"] = _pad_rows(llm.lm_head.weight.data, vocab)
    state.update({f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.multi_modal_projector.") for k in missing):
        raise ValueError(f"assembling LLaVA: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if dtype is not None:
        model = model.to(dtype)
    return model, build_processor(tokenizer, vision["image_size"], vision["patch_size"])


def load_for_training(args: ModelArguments, dtype=None):
    """(model, processor, prune config or None): loaded, pruned if asked, with the right parameters trainable."""
    from ivtp import apply_pruning
    from ivtp.models import check_fits, load_model, preset_aligner

    config = PruneConfig.load(args.prune_config) if args.prune_config else None  # fail before loading
    if config is not None and not args.vision_tower:
        check_fits(config, args.model_name_or_path)
    if args.vision_tower:
        model, processor = build_from_parts(args.model_name_or_path, args.vision_tower, dtype)
    else:
        model, processor = load_model(args.model_name_or_path, dtype=dtype or torch.float32)
    use_projector(model, processor, args)
    if config is not None:
        apply_pruning(model, config, aligner=preset_aligner(args.model_name_or_path), tokenizer=processor.tokenizer)
    model = set_trainable(model, args)
    detach_frozen_tower(model)
    return model, processor, config


def use_projector(model, processor, args: ModelArguments) -> None:
    """--projector: a fresh compressor in place of LLaVA's projector (pretraining), or a check that the checkpoint
    already has the one asked for (instruction tuning from a pretrained compressor). None: as the checkpoint is."""
    from ivtp.projectors import ProjectorError, attach_projector, projector_spec

    spec = projector_spec(model.config)
    if args.projector is None:
        return
    if args.projector != "mlp" and model.config.model_type != "llava":  # the compressors read one 576-patch crop
        raise ProjectorError(f"--projector {args.projector} replaces LLaVA-1.5's projector; "
                             f"{args.model_name_or_path} is {model.config.model_type}")
    if spec is None:
        if args.projector != "mlp":
            attach_projector(model, args.projector, args.projector_tokens, processor=processor)
        return
    if (spec["name"], spec["num_tokens"]) != (args.projector, args.projector_tokens):
        raise ProjectorError(f"{args.model_name_or_path} was trained with the {spec['name']} projector at "
                             f"{spec['num_tokens']} tokens; --projector {args.projector} with --projector_tokens "
                             f"{args.projector_tokens} disagrees (leave --projector out to keep the checkpoint's)")


def set_trainable(model, args: ModelArguments):
    """Pretraining: the projector. Instruction tuning: projector and LLM, or LoRA adapters on the LLM's linear
    layers plus the full projector. The vision tower is always frozen. LLaVA-NeXT's image_newline, the other learnt
    piece between tower and LLM, trains with the projector while the model reads it (`reads_image_newline`)."""
    model.requires_grad_(False)
    projection = [model.model.multi_modal_projector]  # what joins tower and LLM
    if reads_image_newline(model):
        projection.append(model.model.image_newline)
    if args.lora_enable:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)  # freezes all but the adapters: the projection trains after it
        for part in projection:
            part.requires_grad_(True)
        return model
    for part in projection:
        part.requires_grad_(True)
    if args.tune == "projector+llm":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return model


def reads_image_newline(model) -> bool:
    """Whether a LLaVA-NeXT model puts image_newline into the sequence: stock, or pruned with nothing pruned before
    the LLM (the stock layout stands; an in-LLM stage reads the newlines until it drops them). A pruned layout has no newlines (docs/paper.md, "LLaVA-NeXT"), so the parameter would get
    no gradient, which DDP's unused-parameter check refuses."""
    if getattr(model.model, "image_newline", None) is None:
        return False
    state = getattr(model, "ivtp_state", None)
    return state is None or state.layout.stock


def detach_frozen_tower(model) -> None:
    """Run a frozen vision tower without an autograd graph, as LLaVA-1.5's own code does (its tower forward is
    under no_grad).

    With activation checkpointing, transformers makes the output of every input embedding require grad, the
    tower's patch embedding included. The frozen tower then records a graph, keeps its activations (for GTP, the
    float32 attention maps of its rollout layers) and runs a backward pass whose gradients nothing uses. A hook on
    the tower's first layer norm cuts the graph there while no tower parameter trains; a tower that trains is left
    alone. Idempotent."""
    tower = unwrap(model).model.vision_tower
    norm = tower.pre_layrnorm  # every tower forward, stock or pruned (prune_vision_tower), goes through it
    if getattr(norm, "_ivtp_detach_hook", None) is not None:
        return

    def detach_if_frozen(module, args, output):
        if output.requires_grad and not any(p.requires_grad for p in tower.parameters()):
            return output.detach()
        return None

    norm._ivtp_detach_hook = norm.register_forward_hook(detach_if_frozen)


def saved_weights(folder: str) -> dict | None:
    """The model weights save_pretrained wrote into `folder` (model.safetensors, or its index's shards), or None."""
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single, device="cpu")
    if not os.path.isfile(index):
        return None
    import json

    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(folder, shard), device="cpu"))
    return state


def saved_to_own_names(model, state: dict) -> dict:
    """`state` as save_pretrained names it (llava-hf's layout) renamed to the model's own parameter names: the
    mapping transformers reverts on save, read off the model's own state dict (a rename keeps each tensor)."""
    from transformers.core_model_loading import revert_weight_conversion

    own = model.state_dict()
    by_tensor = {id(t): name for name, t in own.items()}
    saved_as = {saved: by_tensor.get(id(t), saved) for saved, t in revert_weight_conversion(model, dict(own)).items()}
    return {saved_as.get(k, k): v for k, v in state.items()}


def unwrap(model):
    """The LlavaForConditionalGeneration under a peft wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---- the trainer ---------------------------------------------------------------------------------------------
def save_inference_files(folder: str, model, processor) -> None:
    """What a checkpoint folder needs beside the weights to load for inference as is: the processor, and for a
    pruned model ivtp_config.json with the aligner it carries (PruningState.save_pretrained)."""
    processor.save_pretrained(folder)
    state = getattr(unwrap(model), "ivtp_state", None)
    if state is not None:
        state.save_pretrained(folder)


class SaveIvtpConfig(TrainerCallback):
    """Every checkpoint folder carries the prune config, its aligner and the processor, so it loads for inference
    as is."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                save_inference_files(folder, self.model, self.processor)


class LlavaTrainer(Trainer):
    """HF Trainer with LLaVA's modality-grouped sampler and a separate projector learning rate."""

    def __init__(self, *args, mm_projector_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mm_projector_lr = mm_projector_lr

    def _get_train_sampler(self, *args, **kwargs):
        if self.args.group_by_modality_length and hasattr(self.train_dataset, "lengths"):
            return ModalityLengthGroupedSampler(
                self.train_dataset.lengths(), self.args.train_batch_size * self.args.gradient_accumulation_steps,
                world_size=self.args.world_size, seed=self.args.seed)
        return super()._get_train_sampler(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume from checkpoint-N's weights through the model's own key mapping. transformers' Trainer loads them
        with a raw load_state_dict, but save_pretrained wrote them in llava-hf's layout (language_model.model.*),
        which transformers 5's LLaVA names model.language_model.*: every key would miss, with a warning only.
        DeepSpeed and FSDP resume from their own files and never come here; LoRA adapters take transformers' path."""
        model = model if model is not None else self.model
        state = saved_weights(resume_from_checkpoint)
        if state is None or hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        own = saved_to_own_names(unwrap(model), state)
        result = model.load_state_dict(own, strict=False)
        tied = set(getattr(unwrap(model), "all_tied_weights_keys", None) or {})
        missing = sorted(set(result.missing_keys) - tied)
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{resume_from_checkpoint}: its weights do not fit this model (missing "
                               f"{missing[:3]}, unexpected {result.unexpected_keys[:3]})")

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is not None or self.mm_projector_lr is None:
            return super().create_optimizer(*args, **kwargs)
        decay = set(self.get_decay_parameter_names(self.model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault(("multi_modal_projector" in name, name in decay), []).append(p)
        params = [{"params": ps, "weight_decay": self.args.weight_decay if dec else 0.0,
                   **({"lr": self.mm_projector_lr} if proj else {})} for (proj, dec), ps in groups.items()]
        cls, kw = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = cls(params, **kw)
        return self.optimizer


def build_trainer(model, processor, model_args: ModelArguments, data_args: DataArguments,
                  train_args: TrainingArguments, records=None) -> LlavaTrainer:
    """The Trainer over `records` (default: load_records(data_args.data_path))."""
    base = unwrap(model)
    dataset = LlavaDataset(
        load_records(data_args.data_path) if records is None else records, processor.tokenizer, processor.image_processor, data_args.template,
        data_args.image_folder, image_tokens=placeholders_per_image(base.config),
        model_max_length=train_args.model_max_length, image_aspect_ratio=data_args.image_aspect_ratio,
        skip_missing=data_args.skip_missing)
    if train_args.gradient_checkpointing and not train_args.gradient_checkpointing_kwargs:
        train_args.gradient_checkpointing_kwargs = {"use_reentrant": False}  # frozen inputs, kwargs through layers
    return LlavaTrainer(model=model, args=train_args, train_dataset=dataset,
                        data_collator=Collator(processor.tokenizer.pad_token_id),
                        callbacks=[SaveIvtpConfig(model, processor)], mm_projector_lr=model_args.mm_projector_lr)


def save_final(trainer: LlavaTrainer, model, processor, merge_lora: bool = True):
    """The final model in the llava-hf layout with ivtp_config.json and the processor. LoRA adapters are saved
    as such, and merged into a full checkpoint under <output_dir>/merged unless merge_lora is False."""
    out = trainer.args.output_dir
    trainer.save_model(out)  # gathers ZeRO-3 shards when the config says stage3_gather_16bit_weights_on_model_save
    if trainer.args.should_save:
        save_inference_files(out, model, processor)
    if hasattr(model, "merge_and_unload") and merge_lora and trainer.args.should_save:
        merged = model.merge_and_unload()
        merged.save_pretrained(os.path.join(out, "merged"))
        save_inference_files(os.path.join(out, "merged"), merged, processor)
    n_skipped = len(getattr(trainer.train_dataset, "skipped", ()))
    if n_skipped:
        logger.warning("%d samples were skipped for missing images", n_skipped)


def run(argv=None, template: str = "vicuna_v1", tune: str = "projector+llm") -> str:
    """Parse, read the data, load (and prune), train, save. Returns the output folder. The data is read and
    checked before the model loads (minutes for a 7B) so that a bad file fails first."""
    model_args, data_args, train_args = parse_args(argv, template=template, tune=tune)
    records = load_records(data_args.data_path)
    model, processor, _ = load_for_training(model_args)
    trainer = build_trainer(model, processor, model_args, data_args, train_args, records)
    resume = train_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=resume if resume not in ("", "False", "false") else None)
    save_final(trainer, model, processor)
    return train_args.output_dir


def main(argv=None, template: str = "vicuna_v1", tune: str = "projector+llm") -> None:
    """train/*.py: `run`, with a bad input (config, data, model name) as one line on stderr and exit code 2,
    as the ivtp command gives it, instead of a traceback from every rank."""
    from ivtp.errors import run_reporting_input_errors

    def train() -> None:
        run(argv, template, tune)

    code = run_reporting_input_errors(train)
    if code:
        sys.exit(code)
