"""The trained compressors on the testbed (issue 21): Honeybee, LLaMA-VID and Qwen-VL in place of LLaVA's projector,
trained with the testbed's recipe, so that `ivtp ablate` reports them beside the pruning methods (docs/testbed.md).

    python -m ivtp.testbed.projectors --out ivtp_out/testbed          # `make testbed-projectors`, after `make testbed`
    python -m ivtp.testbed.projectors --out /tmp/tb --projectors qwen_vl --set pretrain_epochs=0.25

For each projector, on a testbed folder whose data, clip and llm_init stages are done (ivtp.testbed.pipeline):
1. pretrain-<name>  train/pretrain.py with `--projector NAME`: a fresh compressor in place of LLaVA's projector,
                    trained with the LLM on the captions (the pipeline's pretrain stage: same data, epochs, lr)
2. llava-<name>     train/finetune.py from it: compressor and LLM on the QA (the pipeline's finetune stage)

Both run through DeepSpeed as the pipeline's stages do (`pipeline._train`: same batch, precision, schedule and
resuming), with the recipe that <out>/testbed.json records; `--set` changes its training fields only. A projector
whose llava-<name> is finished is skipped; an interrupted stage resumes from its last checkpoint.

Tokens per image: the testbed's budget is 7 of 64, and no compressor can give 7. Honeybee pools to an s x s grid
and Qwen-VL's queries sit on one, so their counts are squares: 9 (3 x 3) is the nearest (4 is further). LLaMA-VID
gives one context token and s x s content tokens: 1 + 4 = 5 is the nearest (10 is further). `--tokens NAME=N`
sets another count (N: a compressor's num_tokens, LLaMA-VID's content tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

from ivtp.data.jsonio import dump_json
from ivtp.names import ALIGNER_META
from ivtp.testbed import pipeline

# num_tokens per compressor (ivtp.projectors.build_projector); tokens_per_image is this, plus LLaMA-VID's context.
TOKENS = {"honeybee": 9, "llama_vid": 4, "qwen_vl": 9}
PROJECTORS = tuple(TOKENS)
# The TestbedConfig fields these stages read: the rest were fixed by the stages that built the data, CLIP and LLM.
TRAINING_FIELDS = ("seed", "batch_size", "train_precision", "max_length", "pretrain_epochs", "pretrain_lr",
                   "finetune_epochs", "finetune_lr")
RECORD = "testbed_projector.json"  # in llava-<name>: what was trained, and with which recipe
NEEDED = ("data", "clip", "llm_init")  # pipeline stages whose outputs these stages read


def model_dir(name: str) -> str:
    """The finetuned model's folder under the testbed's (ablate looks for it there)."""
    return f"llava-{name}"


def pretrain_dir(name: str) -> str:
    return f"pretrain-{name}"


def is_done(out: str, name: str) -> bool:
    """The finetune stage puts the aligner beside the weights last, as the pipeline's finetune stage does."""
    return os.path.isfile(os.path.join(out, model_dir(name), ALIGNER_META))


def trained_projectors(testbed: str) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """({name: (folder, tokens per image)} of the finished trained compressors, [names not trained]) in `testbed`."""
    found, missing = {}, []
    for name in PROJECTORS:
        folder = os.path.join(testbed, model_dir(name))
        if not is_done(testbed, name):
            missing.append(name)
            continue
        with open(os.path.join(folder, "config.json")) as f:
            spec = json.load(f).get("ivtp_projector") or {}
        if spec.get("name") != name:
            raise ValueError(f"{folder}: config.json records no {name} projector ({spec.get('name')})")
        found[name] = (folder, int(spec["tokens_per_image"]))
    return found, missing


# ------------------------------------------------------------------------------------------------------ stages
def recorded_tokens(folder: str) -> int | None:
    """num_tokens of the compressor a checkpoint folder's config.json records (None: no checkpoint there yet)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return (json.load(f).get("ivtp_projector") or {}).get("num_tokens")


def stage_pretrain(cfg: pipeline.TestbedConfig, out: str, name: str, tokens: int) -> None:
    args = pipeline.pretrain_args(cfg, out, output_dir=pretrain_dir(name))
    pipeline._train(cfg, "pretrain", {**args, "projector": name, "projector_tokens": tokens})


def stage_finetune(cfg: pipeline.TestbedConfig, out: str, name: str, tokens: int) -> None:
    # --projector again: train/finetune.py checks that the pretrained checkpoint holds that compressor at that count
    args = pipeline.finetune_args(cfg, out, model=pretrain_dir(name), output_dir=model_dir(name))
    pipeline._train(cfg, "finetune", {**args, "projector": name, "projector_tokens": tokens})
    with open(os.path.join(out, model_dir(name), "config.json")) as f:
        spec = json.load(f)["ivtp_projector"]
    dump_json({"projector": name, "num_tokens": tokens, "tokens_per_image": spec["tokens_per_image"],
               "recipe": dataclasses.asdict(cfg)}, os.path.join(out, model_dir(name), RECORD), indent=1)
    pipeline.attach_aligner(out, model_dir(name))  # last: the folder is finished (is_done)


STAGES = (("pretrain", pretrain_dir, stage_pretrain), ("finetune", model_dir, stage_finetune))


def run(out: str, cfg: pipeline.TestbedConfig, tokens: dict[str, int], progress: bool = True) -> dict:
    """Train each projector of `tokens` ({name: num_tokens}) whose llava-<name> is not finished; returns seconds per
    stage ("<name>/<stage>")."""
    from tqdm import tqdm

    todo = [(name, stage) for name in tokens for stage in STAGES
            if not is_done(out, name) and not (stage[0] == "pretrain"
                                               and os.path.isfile(os.path.join(out, pretrain_dir(name),
                                                                               "config.json")))]
    for name in tokens:
        if is_done(out, name):
            print(f"[projectors] {name}: done already ({model_dir(name)})", flush=True)
    timings: dict[str, float] = {}
    if not todo:
        return timings
    bar = tqdm(todo, desc="projectors", unit="stage", disable=not progress, file=sys.stdout)
    for name, (stage, folder, func) in bar:
        bar.set_postfix_str(f"{name} {stage}")
        tqdm.write(f"[projectors] {name} {stage} ({tokens[name]} tokens) -> {folder(name)}")
        t0 = time.time()
        func(cfg, out, name, tokens[name])
        timings[f"{name}/{stage}"] = round(time.time() - t0, 1)
        tqdm.write(f"[projectors] {name} {stage}: {timings[f'{name}/{stage}']} s")
    bar.close()
    if timings:
        dump_json(timings, os.path.join(out, f"timings_projectors_{int(time.time())}.json"), indent=2)
    return timings


# ------------------------------------------------------------------------------------------------------ the CLI
def load_recipe(out: str, overrides: list[str]) -> pipeline.TestbedConfig:
    """The recipe <out>/testbed.json records, with `--set` overrides of its training fields (ValueError if bad)."""
    path = os.path.join(out, "testbed.json")
    if not os.path.isfile(path):
        raise ValueError(f"{out}: no testbed.json (the recipe its stages were built with)")
    with open(path) as f:
        saved = json.load(f)
    defaults = pipeline.TestbedConfig()
    # JSON writes 1.0 as 1: keep float fields float, so that --set pretrain_epochs=0.5 parses
    saved = {k: float(v) if isinstance(getattr(defaults, k, None), float) and isinstance(v, int) else v
             for k, v in saved.items()}
    try:
        base = pipeline.TestbedConfig(**saved)
    except TypeError as e:
        raise ValueError(f"{path}: not this version's TestbedConfig ({e})") from None
    fixed = [item.partition("=")[0] for item in overrides
             if item.partition("=")[0] not in TRAINING_FIELDS and hasattr(base, item.partition("=")[0])]
    if fixed:
        raise ValueError(f"--set {fixed[0]}: fixed by the stages that built {out} (testbed.json); these stages "
                         f"read only {', '.join(TRAINING_FIELDS)}")
    try:
        return pipeline.config_from_args(False, overrides, base=base)
    except SystemExit as e:  # config_from_args's one-line messages
        raise ValueError(str(e)) from None


def parse_tokens(items: list[str], names: list[str]) -> dict[str, int]:
    """{name: num_tokens} for `names`: TOKENS, with `--tokens NAME=N` overrides (ValueError if bad)."""
    from ivtp.projectors import ProjectorError, build_projector

    tokens = {name: TOKENS[name] for name in names}
    for item in items:
        name, _, value = item.partition("=")
        if name not in tokens:
            raise ValueError(f"--tokens {item}: {name!r} is not one of the projectors trained here "
                             f"({', '.join(names)})")
        try:
            tokens[name] = int(value)
        except ValueError:
            raise ValueError(f"--tokens {item}: expected NAME=N, N a whole number") from None
    for name, n in tokens.items():
        try:  # the geometry check, on the testbed's grid (64 patches), before anything trains
            build_projector(name, 8, 8, n, 64, **({"width": 8, "layers": 1, "heads": 1} if name == "llama_vid"
                                                  else {"hidden": 8, "depth": 1} if name == "honeybee" else {}))
        except ProjectorError as e:
            raise ValueError(f"--tokens {name}={n}: {e}") from None
    return tokens


def check_testbed(out: str) -> None:
    """The pipeline stages these read must be done (ValueError naming the first that is not)."""
    for stage in NEEDED:
        if not os.path.exists(os.path.join(out, pipeline.STAGE_OUTPUTS[stage])):
            raise ValueError(f"{out}: the testbed's {stage} stage is not done ({pipeline.STAGE_OUTPUTS[stage]} is "
                             f"missing); run `python -m ivtp.testbed.pipeline --out {out}` (make testbed) first")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ivtp.testbed.projectors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the testbed folder (ivtp.testbed.pipeline's --out)")
    p.add_argument("--projectors", default=",".join(PROJECTORS),
                   help=f"comma-separated subset of {','.join(PROJECTORS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a training field of the recipe: {', '.join(TRAINING_FIELDS)}")
    p.add_argument("--tokens", action="append", default=[], metavar="NAME=N",
                   help="a compressor's token count (default: " + ", ".join(f"{k}={v}" for k, v in TOKENS.items())
                        + "; LLaMA-VID adds its context token)")
    p.add_argument("--force", action="store_true", help="delete the chosen projectors' folders and train them again")
    args = p.parse_args(argv)
    names = [n for n in args.projectors.split(",") if n]
    unknown = [n for n in names if n not in PROJECTORS]
    if unknown or not names:
        p.error(f"--projectors {args.projectors}: choose from {', '.join(PROJECTORS)}")
    try:
        check_testbed(args.out)
        cfg = load_recipe(args.out, args.set)
        tokens = parse_tokens(args.tokens, list(dict.fromkeys(names)))
    except ValueError as e:
        p.error(str(e))
    if args.force:
        for name in tokens:
            for folder in (pretrain_dir(name), model_dir(name)):
                shutil.rmtree(os.path.join(args.out, folder), ignore_errors=True)
    for name, n in tokens.items():  # a folder trained at another count is not what was asked for
        for folder in (pretrain_dir(name), model_dir(name)):
            held = recorded_tokens(os.path.join(args.out, folder))
            if held is not None and held != n:
                p.error(f"{os.path.join(args.out, folder)} holds {name} at {held} tokens, not {n}; --force trains "
                        "it again")
    run(args.out, cfg, tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
