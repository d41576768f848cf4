"""The testbed: a miniature of the whole IVTP pipeline that trains on 2 CPU cores (docs/testbed.md).

    python -m ivtp.testbed.pipeline --out ivtp_out/testbed            # `make testbed`: data, CLIP, LLaVA, eval
    python -m ivtp.testbed.pipeline --out /tmp/tb --smoke              # minutes: every stage on a few samples

Stages, each skipped when its output exists (``--force STAGE`` redoes one and what follows):
1. data      ivtp.data.shapes.generate_testbed: 112 px scenes (64 patches), captions, QA, GQA/POPE-layout evals
2. clip      a tiny open_clip CLIP trained contrastively on the captions; exported as an HF vision tower and
             as the aligner (text tower + visual projection) for IVTP's pseudo-CLS
2b. aligner  the aligner's text tower tuned on web-like captions (single objects, bare colours and shapes), the
             image side locked: it then rates words as real CLIP does (testbed.clip.train_aligner)
3. llm_init  a small Llama with random weights and a tokenizer trained on the testbed's text
4. pretrain  train/pretrain.py (DeepSpeed ZeRO-2 on CPU): projector and LLM on the captions, plain template
5. finetune  train/finetune.py: projector + LLM on the QA, vicuna_v1 template, unpruned
6. retrain   train/finetune.py from the finetuned model with IVTP pruning active (the paper's retraining mode)

The same code paths as for LLaVA-1.5-7B: only the sizes differ, and they all live in `TestbedConfig`, which is
saved as testbed.json in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ivtp.data.jsonio import dump_json
from ivtp.names import ALIGNER_FILE, ALIGNER_META

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("data", "clip", "aligner", "llm_init", "pretrain", "finetune", "retrain")
CONTRASTIVE_ALIGNER = "aligner_contrastive.safetensors"  # the clip stage's aligner, before the aligner stage


@dataclass
class TestbedConfig:
    """Every size and step count of a testbed run (the one place they are set)."""

    seed: int = 0
    n_train: int = 24000  # training images; each gives one caption and about 11.5 questions
    n_eval: int = 300  # images per eval split (GQA-layout questions, POPE-layout questions)
    image_size: int = 112  # 8 x 8 patches of 14 px: 64 visual tokens, so 7 kept is the paper's 1/9
    clip_steps: int = 450  # contrastive steps of `clip_batch` captioned images (1.2 epochs of 24k, ~10 min)
    clip_batch: int = 64  # batch 256 (lr 1e-3) sat at chance loss for a CPU-sized budget; 64 learns at once
    clip_lr: float = 5e-4
    clip_threads: int = 1  # exact repeats need a fixed count; on a shared 2-core machine 1 beats 2
    clip_precision: str = "bf16"  # autocast of the forward pass; weights and optimiser stay fp32
    # train_clip's auxiliary loss: a linear head classifies each object from its patches at the feature layer, on
    # each label set here (ivtp.data.shapes.REGION_LABELS), its cross-entropy weighted as given ({}: contrastive
    # only). Captions can be told apart by colour alone, so contrastive training alone leaves shape out of the
    # tower (a linear probe reads it at 51%; with shape at 3, 93%). Position was there but faint: the trained
    # projector dropped it (left/right 90% on the tower, 55% after it) and the LLaVA answered left/right at
    # chance. At weight 3, position took 68% of the patch features' variance (11% without it) and slowed all else
    # the LLM learns; at 0.3 it takes 43% and a probe still reads left/right at 99%; docs/testbed.md.
    clip_region_weights: dict = field(default_factory=lambda: {"shape": 3.0, "position": 0.3})
    # Questions per finetuning image, by type (ivtp.data.shapes.questions): 12 turns share one image's visual
    # tokens and the system prompt, and the types the LLM learns last (position, existence) are asked most.
    finetune_counts: dict = field(default_factory=lambda: {"colour": 2, "shape": 2, "position": 3, "count": 2,
                                                           "existence": 3})
    # The aligner stage: locked-image tuning of the text tower on web-like captions (0 steps: the contrastive
    # aligner as the clip stage exports it, whose shape words rate at chance). The image embeddings of the first
    # `aligner_images` training images are computed once; the last 256 of them are held out for its metrics.
    aligner_steps: int = 1000
    aligner_images: int = 8000
    aligner_batch: int = 128
    aligner_lr: float = 5e-4
    vocab_size: int = 600
    # The LLM is sized for 2 CPU cores: a training step costs about 6 x params FLOPs per token, and a finetuning
    # sequence is 64 visual + ~245 text tokens.
    llm_hidden: int = 128
    llm_layers: int = 6
    llm_heads: int = 4
    llm_intermediate: int = 384
    batch_size: int = 16  # twice the optimiser steps of 32 for the same samples
    # The DeepSpeed stages' precision, as LLaVA-1.5 trains (bf16 weights, fp32 optimiser state): 1.4x faster per
    # step than fp32 on this machine's AVX512-BF16 cores.
    train_precision: str = "bf16"
    # Captions supervise every object's colour, shape and place: the densest grounding signal per token. Their
    # loss was still falling steadily at 0.8 epochs (lr 2e-3, batch 16), so the LLM gets 1.5 epochs of them.
    pretrain_epochs: float = 1.5  # of n_train captions
    pretrain_lr: float = 2e-3
    finetune_epochs: float = 1.0  # of n_train multi-turn records: 24k records, about 277k questions
    finetune_lr: float = 1e-3
    retrain_epochs: float = 0.3
    retrain_lr: float = 3e-4
    max_length: int = 384  # tokens per training sequence (64 visual + a 12-turn conversation: ~310)
    retrain_method: str = "ivtp"
    retrain_tokens: int = 7

    def __post_init__(self):
        for name in ("clip_precision", "train_precision"):
            if getattr(self, name) not in ("bf16", "fp32"):
                raise ValueError(f"TestbedConfig.{name} is {getattr(self, name)!r}; expected 'bf16' or 'fp32'")
        from ivtp.data.shapes import check_region_labels

        try:
            check_region_labels(self.clip_region_weights)
        except ValueError as e:
            raise ValueError(f"TestbedConfig.clip_region_weights: {e}") from None

    @classmethod
    def smoke(cls) -> "TestbedConfig":
        """Every stage on a handful of samples: a check that the pipeline runs, not a model."""
        return cls(n_train=64, n_eval=12, clip_steps=2, clip_batch=32, clip_precision="fp32", aligner_steps=2,
                   aligner_images=48, aligner_batch=16, vocab_size=300, llm_hidden=64, llm_layers=6,
                   llm_intermediate=128, batch_size=8, pretrain_epochs=1, finetune_epochs=1, retrain_epochs=1)


def llm_config(cfg: TestbedConfig, vocab: int) -> dict:
    return dict(hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_intermediate,
                num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
                num_key_value_heads=cfg.llm_heads, max_position_embeddings=512, rms_norm_eps=1e-5,
                vocab_size=vocab, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------------ stages
def stage_data(cfg: TestbedConfig, out: str) -> None:
    from ivtp.data.shapes import generate_testbed

    generate_testbed(os.path.join(out, "data"), cfg.n_train, cfg.n_eval, cfg.seed, image_size=cfg.image_size,
                     finetune_counts=cfg.finetune_counts)


def stage_clip(cfg: TestbedConfig, out: str) -> None:
    from ivtp.data.shapes import object_regions
    from ivtp.testbed.clip import export_aligner, export_vision_tower, train_clip

    data, clip_dir = os.path.join(out, "data"), os.path.join(out, "clip")
    labels, weights = tuple(cfg.clip_region_weights), tuple(cfg.clip_region_weights.values())
    regions = object_regions(cfg.seed, cfg.n_train, cfg.image_size, labels=labels) if labels else None
    model, _ = train_clip(os.path.join(data, "clip_train.tsv"), clip_dir, steps=cfg.clip_steps,
                          batch_size=cfg.clip_batch, lr=cfg.clip_lr, threads=cfg.clip_threads,
                          precision=cfg.clip_precision, seed=cfg.seed, regions=regions,
                          region_weight=weights or 0.0)
    export_vision_tower(model, os.path.join(clip_dir, "vision"))
    export_aligner(model, os.path.join(clip_dir, ALIGNER_FILE), testbed_texts(data))
    dump_json({"model": "ivtp-testbed-clip"}, os.path.join(clip_dir, ALIGNER_META))


def stage_aligner(cfg: TestbedConfig, out: str) -> None:
    from transformers import CLIPVisionModel

    from ivtp.aligner import Aligner
    from ivtp.config import AlignerConfig
    from ivtp.data.shapes import image_name, scene_for, web_caption_words
    from ivtp.testbed.clip import MODEL_NAME, aligner_metrics, export_aligner, tower_cls, train_aligner

    clip_dir, data = os.path.join(out, "clip"), os.path.join(out, "data")
    contrastive = os.path.join(clip_dir, CONTRASTIVE_ALIGNER)
    if not os.path.exists(contrastive):  # keep the clip stage's aligner: the comparison, and a redo's start
        shutil.copy(os.path.join(clip_dir, ALIGNER_FILE), contrastive)
    aligner = Aligner.from_config(AlignerConfig(model=MODEL_NAME, pretrained=contrastive))
    tower = CLIPVisionModel.from_pretrained(os.path.join(clip_dir, "vision")).eval()
    n = min(cfg.aligner_images, cfg.n_train)
    scenes = [scene_for(cfg.seed, "train", i, cfg.image_size) for i in range(n)]
    cls = tower_cls(tower, [os.path.join(data, "images", image_name("train", i)) for i in range(n)], progress=True)
    held = min(256, n // 4)
    before = aligner_metrics(aligner, cls[n - held:], scenes[n - held:])
    metrics = train_aligner(aligner, cls, scenes, steps=cfg.aligner_steps, batch_size=cfg.aligner_batch,
                            lr=cfg.aligner_lr, eval_images=held, seed=cfg.seed)
    export_aligner(aligner, os.path.join(clip_dir, ALIGNER_FILE), [*testbed_texts(data), *web_caption_words()])
    dump_json({"contrastive": before, "tuned": metrics}, os.path.join(clip_dir, "aligner_metrics.json"), indent=1)


TEMPLATES = (("pretrain.json", "plain"), ("finetune.json", "vicuna_v1"))  # each stage's data and its template


def _conversations(data: str):
    """(template, conversations) of every record of the testbed's two training files."""
    for name, template in TEMPLATES:
        with open(os.path.join(data, name)) as f:
            for record in json.load(f):
                yield template, record["conversations"]


def training_texts(data: str):
    """The tokenizer's corpus: every training sequence as train/*.py renders it, chat template included. With the
    template in the corpus only once, "USER:" and "ASSISTANT:" fell below BPE's merge frequency and cost 16
    single-letter tokens per turn (a six-question record was ~265 text tokens; ~136 with the template learnt)."""
    from ivtp.data.templates import IMAGE_PLACEHOLDER, render

    for template, conversations in _conversations(data):
        yield render(template, conversations, eos="").text.replace(IMAGE_PLACEHOLDER, "")


def testbed_texts(data: str):
    """Every string the testbed's models read or write: captions, questions, answers, the chat template."""
    from ivtp.data.templates import IMAGE_PLACEHOLDER, VICUNA_V1_SYSTEM

    yield f"{VICUNA_V1_SYSTEM} USER: ASSISTANT:"
    for _, conversations in _conversations(data):
        for turn in conversations:
            yield turn["value"].replace(IMAGE_PLACEHOLDER, "")


def stage_llm_init(cfg: TestbedConfig, out: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ivtp.data.tokenizer import train_tokenizer

    path = os.path.join(out, "llm-init")
    tokenizer = train_tokenizer(training_texts(os.path.join(out, "data")), path, vocab_size=cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **llm_config(cfg, len(tokenizer)))
    LlamaForCausalLM(config).save_pretrained(path)


# Optimiser steps between the checkpoints a DeepSpeed stage leaves in its output folder (about 10 minutes of fp32
# pretraining here). Not a recipe setting: the trained model does not depend on it, so it stays out of testbed.json.
CHECKPOINT_STEPS = 250


def train_command(cfg: TestbedConfig, script: str, args: dict) -> list[str]:
    """A DeepSpeed ZeRO-2 CPU run of train/<script>.py, as `make train-smoke` and the 8-GPU recipes run it. It
    keeps its latest checkpoint in the output folder and, when one is there (an interrupted stage), resumes from it:
    a stage of hours need not start over."""
    from transformers.trainer_utils import get_last_checkpoint

    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    common = {"deepspeed": os.path.join(REPO, "configs", "deepspeed", "zero2.json"),
              "per_device_train_batch_size": cfg.batch_size, "warmup_steps": 0.05, "lr_scheduler_type": "cosine",
              "weight_decay": 0.0, "model_max_length": cfg.max_length, "use_cpu": True, "report_to": "none",
              "save_strategy": "steps", "save_steps": CHECKPOINT_STEPS, "save_total_limit": 1, "logging_steps": 25,
              "seed": cfg.seed, "dataloader_num_workers": 1, "disable_tqdm": False,
              "bf16": cfg.train_precision == "bf16"}
    out = args.get("output_dir")
    last = get_last_checkpoint(out) if out and os.path.isdir(out) else None
    if last:
        print(f"[testbed] resuming {script} from {last}", flush=True)
        common["resume_from_checkpoint"] = last
    # A port of its own: DeepSpeed's default (29500) would clash with any other run on the machine.
    argv = [deepspeed, "--num_gpus", "1", "--master_port", str(free_port()),
            os.path.join(REPO, "train", f"{script}.py")]
    for key, value in {**common, **args}.items():
        argv += [f"--{key}", str(value)]
    return argv


def pretrain_args(cfg: TestbedConfig, out: str, output_dir: str = "pretrain") -> dict:
    """The pretrain stage's train/pretrain.py arguments, into <out>/<output_dir> (also ivtp.testbed.projectors')."""
    data = os.path.join(out, "data")
    return {
        "model_name_or_path": os.path.join(out, "llm-init"), "vision_tower": os.path.join(out, "clip", "vision"),
        "data_path": os.path.join(data, "pretrain.json"), "image_folder": data,
        "output_dir": os.path.join(out, output_dir),
        "num_train_epochs": cfg.pretrain_epochs, "learning_rate": cfg.pretrain_lr,
        # LLaVA-1.5 pretrains the projector alone because Vicuna already speaks; the testbed's LLM starts from
        # random weights, so here the captions also teach it the language.
        "tune": "projector+llm"}


def stage_pretrain(cfg: TestbedConfig, out: str) -> None:
    _train(cfg, "pretrain", pretrain_args(cfg, out))


def finetune_args(cfg: TestbedConfig, out: str, model: str = "pretrain", output_dir: str = "llava") -> dict:
    """The finetune stage's train/finetune.py arguments: <out>/<model> finetuned into <out>/<output_dir> (also
    ivtp.testbed.projectors')."""
    data = os.path.join(out, "data")
    return {
        "model_name_or_path": os.path.join(out, model), "data_path": os.path.join(data, "finetune.json"),
        "image_folder": data, "output_dir": os.path.join(out, output_dir), "num_train_epochs": cfg.finetune_epochs,
        "learning_rate": cfg.finetune_lr, "group_by_modality_length": True}


def stage_finetune(cfg: TestbedConfig, out: str) -> None:
    _train(cfg, "finetune", finetune_args(cfg, out))
    attach_aligner(out, "llava")


PAPER_FORM = "paper:clip"  # the retrain stage's form: the paper's, as `retrain_method` at `retrain_tokens`


def extension_slug(extension: str) -> str:
    """A folder-safe name: "llm_only@1:clip" -> "llm_only_1_clip"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", extension)


def retrain_dir(extension: str = PAPER_FORM) -> str:
    """The retrained model's folder under the testbed's: llava-ivtp for the paper's form (the one `make testbed`
    ships), llava-ivtp-<extension> for one of ours."""
    return "llava-ivtp" if extension == PAPER_FORM else f"llava-ivtp-{extension_slug(extension)}"


def stage_retrain(cfg: TestbedConfig, out: str, extension: str = PAPER_FORM) -> None:
    """Retrain the finetuned model with pruning active: the paper's IVTP, or with `extension` one of our
    extensions (ivtp.testbed.configs.EXTENSIONS), into retrain_dir(extension)."""
    from ivtp.testbed.configs import extension_config, fit_prune_config, write_yaml

    data, aligner = os.path.join(out, "data"), os.path.join(out, "clip", ALIGNER_FILE)
    if extension == PAPER_FORM:
        config = fit_prune_config(cfg.retrain_method, cfg.retrain_tokens, cfg.llm_layers, aligner=aligner)
        name = f"retrain_{cfg.retrain_method}_{cfg.retrain_tokens}"
    else:  # an extension is IVTP's, at the recipe's budget
        config = extension_config(extension, cfg.retrain_tokens, cfg.llm_layers, aligner=aligner)
        name = f"retrain_ivtp_{cfg.retrain_tokens}_{extension_slug(extension)}"
    config_path = write_yaml(config, os.path.join(out, "configs", f"{name}.yaml"))
    _train(cfg, "finetune", {
        "model_name_or_path": os.path.join(out, "llava"), "prune_config": config_path,
        "data_path": os.path.join(data, "finetune.json"), "image_folder": data,
        "output_dir": os.path.join(out, retrain_dir(extension)), "num_train_epochs": cfg.retrain_epochs,
        "learning_rate": cfg.retrain_lr, "group_by_modality_length": True})
    attach_aligner(out, retrain_dir(extension))


def attach_aligner(out: str, model_dir: str) -> None:
    """Put the aligner beside the model's weights: a testbed checkpoint carries its own (ivtp.models)."""
    for name in (ALIGNER_FILE, ALIGNER_META):
        shutil.copy(os.path.join(out, "clip", name), os.path.join(out, model_dir, name))


STAGE_FUNCS = {"data": stage_data, "clip": stage_clip, "aligner": stage_aligner, "llm_init": stage_llm_init,
               "pretrain": stage_pretrain, "finetune": stage_finetune, "retrain": stage_retrain}
STAGE_OUTPUTS = {"data": "data/manifest.json", "clip": f"clip/{ALIGNER_META}", "aligner": "clip/aligner_metrics.json",
                 "llm_init": "llm-init/config.json", "pretrain": "pretrain/config.json",
                 "finetune": f"llava/{ALIGNER_META}", "retrain": f"{retrain_dir()}/{ALIGNER_META}"}


def run(out: str, cfg: TestbedConfig, stages=STAGES, force: str | None = None,
        retrain_as: str = PAPER_FORM) -> dict:
    """Run the stages whose outputs are missing (or from `force` on); returns seconds per stage. `retrain_as`: the
    retrain stage's form, the paper's or one of our extensions (each into its own folder, retrain_dir)."""
    os.makedirs(out, exist_ok=True)
    saved = os.path.join(out, "testbed.json")
    if os.path.exists(saved):
        with open(saved) as f:
            old = json.load(f)
        if old != dataclasses.asdict(cfg) and force is None:
            raise SystemExit(f"{out} was built with other settings ({saved}); use another --out or --force data")
    dump_json(dataclasses.asdict(cfg), saved, indent=2)
    redo = set(STAGES[STAGES.index(force):]) if force else set()
    timings = {}
    for stage in stages:
        extra = (retrain_as,) if stage == "retrain" and retrain_as != PAPER_FORM else ()
        output = f"{retrain_dir(*extra)}/{ALIGNER_META}" if extra else STAGE_OUTPUTS[stage]
        if os.path.exists(os.path.join(out, output)) and stage not in redo:
            print(f"[testbed] {stage}: done already ({output})", flush=True)
            continue
        print(f"[testbed] {stage} {' '.join(extra)}...", flush=True)
        t0 = time.time()
        STAGE_FUNCS[stage](cfg, out, *extra)
        timings[stage] = round(time.time() - t0, 1)
        print(f"[testbed] {stage}: {timings[stage]} s", flush=True)
    dump_json(timings, os.path.join(out, f"timings_{int(time.time())}.json"), indent=2)
    return timings


def ship(out: str, dest: str, dtype: str = "float16", retrained: str = PAPER_FORM) -> dict[str, int]:
    """Copy the model retrained in the form `retrained` into the package (`dest`, ivtp/assets/testbed) as
    llava-ivtp, in fp16, with its tokenizer, processor, prune config and aligner, so that `ivtp demo` and `--model
    testbed` use it. Only one model ships (~11 MB in fp16 with its aligner; two would exceed the 20 MB the repo
    allows): the unpruned-trained one stays in the testbed folder. Returns file sizes."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src, dst = os.path.join(out, retrain_dir(retrained)), os.path.join(dest, retrain_dir())
    if not os.path.isdir(src):
        raise SystemExit(f"--ship: {src} is not trained (run the retrain stage for {retrained})")
    shutil.rmtree(dst, ignore_errors=True)
    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=getattr(torch, dtype))
    model.save_pretrained(dst)
    AutoProcessor.from_pretrained(src).save_pretrained(dst)
    for extra in (ALIGNER_FILE, ALIGNER_META):
        shutil.copy(os.path.join(src, extra), os.path.join(dst, extra))
    if os.path.exists(os.path.join(src, "ivtp_config.json")):
        # The retraining config named the aligner by its path on this machine; the shipped folder carries
        # the aligner beside the weights (ivtp.models.preset_aligner), so name that file instead.
        from ivtp.config import PruneConfig

        config = PruneConfig.from_pretrained(src)
        if config.method == "ivtp":
            config.llm.aligner.pretrained = ALIGNER_FILE
        config.save_pretrained(dst)
    sizes = {}
    for root, _, files in os.walk(dst):
        for f in files:
            sizes[os.path.relpath(os.path.join(root, f), dest)] = os.path.getsize(os.path.join(root, f))
    for report in ("ablate/ablate.json",):
        if os.path.exists(os.path.join(out, report)):
            # The rows name the aligner by its absolute path on the machine that ran them: ship those paths
            # relative to the testbed folder instead, so the record says what was used and not where.
            with open(os.path.join(out, report), encoding="utf-8") as f:
                rows = relative_to(json.load(f), out)
            dump_json(rows, os.path.join(dest, os.path.basename(report)), indent=1)
    return sizes


def relative_to(obj, root: str):
    """`obj` (JSON: dicts, lists, strings, ...) with every string that is a path under `root` made relative to it."""
    prefix = os.path.abspath(root) + os.sep
    if isinstance(obj, dict):
        return {k: relative_to(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_to(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith(prefix):
        return os.path.relpath(obj, root)
    return obj


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(cfg: TestbedConfig, script: str, args: dict) -> None:
    """Run a DeepSpeed stage (resuming it if it was interrupted); once it has finished, its checkpoints go."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    _run(train_command(cfg, script, args))
    for name in os.listdir(args["output_dir"]):
        if name.startswith(PREFIX_CHECKPOINT_DIR + "-"):
            shutil.rmtree(os.path.join(args["output_dir"], name))


def _run(argv: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(argv, check=True, env=env, cwd=REPO)


def config_from_args(smoke: bool, overrides: list[str], base: TestbedConfig | None = None) -> TestbedConfig:
    """The recipe (or its smoke version, or `base`) with `--set KEY=VALUE` overrides; dict fields take JSON."""
    cfg = base if base is not None else TestbedConfig.smoke() if smoke else TestbedConfig()
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(cfg)}:
            raise SystemExit(f"--set {key}: not a TestbedConfig field")
        current = getattr(cfg, key)
        try:
            changes[key] = json.loads(value) if isinstance(current, dict) else type(current)(value)
        except ValueError as e:
            raise SystemExit(f"--set {key}={value}: {e}") from None
    try:
        return dataclasses.replace(cfg, **changes)  # runs the field checks again
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ivtp_out/testbed")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every stage runs")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--force", choices=STAGES, default=None, help="redo this stage and the ones after it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TestbedConfig field")
    p.add_argument("--retrain-as", default=PAPER_FORM, metavar="EXTENSION",
                   help="the retrain stage's (and --ship's) form: the paper's, one of our extensions "
                        "(ivtp.testbed.configs.EXTENSIONS), trained into llava-ivtp-<extension>, or 'best' for "
                        "BEST_EXTENSION (the form make testbed ships)")
    p.add_argument("--ship", default=None, metavar="DIR",
                   help="only copy the trained models, in fp16, into DIR (make testbed: ivtp/assets/testbed)")
    args = p.parse_args(argv)
    from ivtp.testbed.configs import BEST_EXTENSION, EXTENSIONS

    if args.retrain_as == "best":
        args.retrain_as = BEST_EXTENSION
    if args.retrain_as not in EXTENSIONS:
        p.error(f"--retrain-as {args.retrain_as}: choose from {', '.join(EXTENSIONS)}")
    if args.ship:
        sizes = ship(args.out, args.ship, retrained=args.retrain_as)
        print(json.dumps(sizes, indent=1))
        print(f"shipped {sum(sizes.values()) / 2**20:.1f} MiB to {args.ship}")
        return 0
    cfg = config_from_args(args.smoke, args.set)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    run(args.out, cfg, stages, args.force, args.retrain_as)
    return 0


if __name__ == "__main__":
    sys.exit(main())
