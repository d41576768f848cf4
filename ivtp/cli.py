"""The `ivtp` command: demo, generate, visualize, convert."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ivtp.errors import InputError, run_reporting_input_errors
from ivtp.names import (ALLOCATORS, DEFAULT_BUDGETS, DTYPE_NAMES, MODEL_ALIASES, ON_BAD_IMAGE, PRESET_NAMES,
                        PROJECTOR_NAMES, SUITES, TESTBED_MODEL, TINY_TOKENIZER)

# torch and transformers are imported inside the commands: `ivtp --help` and argument errors answer at once.


def _model_args(p: argparse.ArgumentParser, default_model: str = "tiny-random") -> None:
    p.add_argument("--model", default=default_model,
                   help=f"preset ({', '.join((*PRESET_NAMES, *MODEL_ALIASES))}), llava-hf folder or hub id in the cache")
    p.add_argument("--random-weights", action="store_true", help="build the preset's architecture, random weights")
    p.add_argument("--prune-config", default=None,
                   help="prune config YAML; 'none' runs the unpruned model (default: PruneConfig(), the paper's "
                        "setting, which configs/ivtp_64.yaml spells out)")
    p.add_argument("--method", default=None,
                   help="pruning method (ivtp, random, topk, spatial, evit, tome, fastervlm, vispruner, fastv, visiondrop, sparsevlm, "
                        "topk+, tome+), with its defaults unless --prune-config gives its section")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None)
    p.add_argument("--device", default=None, help="cuda if one is available, else cpu")
    p.add_argument("--attn-implementation", default=None, help="sdpa (default), eager, flash_attention_2")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    _compile_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="run each pruned prefill as one compiled graph (torch.compile, fullgraph; default backend "
                        "inductor; docs/benchmarks.md); prompts are padded on the left to --compile-bucket tokens")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode: reduce-overhead replays CUDA graphs on a GPU")
    p.add_argument("--compile-bucket", type=positive_int, default=None, help="prompt-length bucket (default 32)")


def _compile(args) -> dict | None:
    """The CompileOptions fields the --compile flags give, or None."""
    if args.compile is None:
        if args.compile_mode is not None or args.compile_bucket is not None:
            raise InputError("--compile-mode and --compile-bucket need --compile")
        return None
    options = {"backend": args.compile, "mode": args.compile_mode}
    return options if args.compile_bucket is None else {**options, "bucket": args.compile_bucket}


def _prune_config(args):
    from ivtp.models import resolve_prune_config

    return resolve_prune_config(args.prune_config, args.method, args.model)


def _load(args, config=None):
    from ivtp.models import load_for_inference

    config = _prune_config(args) if config is None else config
    model, processor = load_for_inference(args.model, config, random_weights=args.random_weights, dtype=args.dtype,
                                          device=_device(args), attn_implementation=args.attn_implementation,
                                          compile=_compile(args))
    return model, processor, config


def _device(args) -> str:
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def _dtype(name: str | None):
    from ivtp.models import DTYPES

    return None if name is None else DTYPES[name]


def _step_names(model) -> list[str]:
    state = getattr(model, "ivtp_state", None)
    return state.step_names() if state is not None else ["input"]


def _print_json(payload) -> None:
    """`--json` output: the payload, indented, and a final newline."""
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _report(args, model, config, results, extra: dict | None = None) -> None:
    steps = _step_names(model)
    if args.json:
        state = getattr(model, "ivtp_state", None)
        aligner = getattr(state, "aligner", None)
        n_layers = model.config.text_config.num_hidden_layers
        per_layer = state.llm_tokens_per_layer(n_layers) if state is not None else None
        payload = {
            "model": args.model,
            "prune_config": None if config is None else config.to_dict(),
            "aligner": None if aligner is None else aligner.name,
            "steps": steps,
            "answers": [r.answer for r in results],
            # Comparable budgets: visual tokens per image in every LLM layer, their mean (the layer-averaged
            # equivalent) and the count that reaches the last layer.
            "llm_visual_tokens_per_layer": per_layer,
            "equivalent_visual_tokens": None if per_layer is None else round(sum(per_layer) / len(per_layer), 2),
            "final_visual_tokens": None if per_layer is None else per_layer[-1],
            "visual_tokens": [r.visual_tokens for r in results],
            "samples": [r.to_json() for r in results],
            **(extra or {}),
        }
        _print_json(payload)
        return
    for i, r in enumerate(results):
        print(f"[{i}] {r.prompt}")
        print(f"    answer: {r.answer}")
        if r.visual_tokens:
            print("    visual tokens: " + ", ".join(f"{s}={n}" for s, n in zip(steps, r.visual_tokens)))
        else:
            print("    visual tokens: none (text-only)")
    for k, v in (extra or {}).items():
        print(f"{k}: {v}")


def _write_overlays(results, model, out_dir: str, prefix: str) -> list[str]:
    from ivtp.patch.llava import num_patches
    from ivtp.viz import anyres_views, denormalize, overlay_panel, square_grid

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, r in enumerate(results):
        if r.pixel_values is None:
            continue
        counts = " -> ".join(f"{n}" for n in r.visual_tokens)
        caption = f"Q: {r.prompt}\nA: {r.answer[:60]}\nvisual tokens: {counts}"
        if r.guidance:
            caption += f"\npseudo-CLS from: {r.guidance['pseudo_cls_source']} (highlighted words, CLIP relevance)"
        selected = {t["position"] for t in r.guidance.get("selected_tokens", [])}
        words = [{**t, "selected": t["position"] in selected} for t in r.guidance.get("instruction_tokens", [])]
        path = os.path.join(out_dir, f"{prefix}{i}.png")
        if r.image_size is None:
            views = [(denormalize(r.pixel_values), r.kept_patches, square_grid(num_patches(model.config)))]
        else:  # LLaVA-NeXT: the base view, and the whole image its tiles cover
            views = anyres_views(r.pixel_values, r.kept_patches, r.image_size, model.config)
        overlay_panel(views, caption, words).save(path)
        paths.append(path)
    return paths


def _samples_from_args(args):
    from ivtp.data.templates import IMAGE_PLACEHOLDER
    from ivtp.inference import Sample, load_image

    if not args.prompt:
        raise InputError("give at least one --prompt")
    images = args.image or []
    if len(images) != len(args.prompt):
        raise InputError(f"{len(images)} --image for {len(args.prompt)} --prompt; give them in pairs "
                         "(use --image none for a text-only prompt)")
    samples = [Sample(p, None if i.lower() == "none" else i) for i, p in zip(images, args.prompt)]
    for n, s in enumerate(samples, 1):  # fail on a bad prompt or image before the model loads
        if IMAGE_PLACEHOLDER in s.prompt:
            raise InputError(f"--prompt {n} contains {IMAGE_PLACEHOLDER}: pass the bare question, and the image "
                             "with --image (the template places it)")
        if s.image is not None:
            load_image(s.image)  # missing or undecodable: one line naming the file
    return samples


def cmd_demo(args) -> None:
    """One generated scene, one question about one object among several, the answer and where the kept
    patches went. On the testbed model (the default when it is shipped) the answer is meant to be right and the
    kept patches to gather on the object; on tiny-random both are noise, but the pruning and counts are real."""
    import random

    from ivtp.data.shapes import ask_colour, ask_shape, render, scene_for, target_patches
    from ivtp.inference import Sample, generate

    t0 = time.time()
    model, processor, config = _load(args)
    size = processor.image_processor.crop_size["height"]
    scene = scene_for(args.seed, "demo", 0, size)
    rng = random.Random(args.seed)
    question = ask_colour(scene, rng) or ask_shape(scene, rng)
    prompt = question["question"] + "\nAnswer the question using a single word or phrase."
    results = generate(model, processor, [Sample(prompt, render(scene))], max_new_tokens=args.max_new_tokens)
    paths = _write_overlays(results, model, args.out, "demo_")
    # Patch indices at the tower's resolution (the processor resizes to `size`: the scene is drawn at it).
    target = set(target_patches(scene, question))
    kept = set(results[0].kept_patches)
    extra = {"overlays": paths, "question": question["question"], "expected": question["answer"],
             "correct": results[0].answer.strip().rstrip(".").lower() == question["answer"],
             "target_patches": sorted(target), "target_patches_kept": len(target & kept),
             "kept_on_target_share": round(len(target & kept) / max(1, len(kept)), 3),
             "target_share_of_image": round(len(target) / results[0].visual_tokens[0], 3),  # chance level
             "seconds": round(time.time() - t0, 2)}
    if args.model == "tiny-random":
        extra["note"] = "tiny-random has random weights: the answer is noise; the pruning and counts are real"
    _report(args, model, config, results, extra)


def cmd_generate(args) -> None:
    from ivtp.inference import generate

    samples = _samples_from_args(args)
    model, processor, config = _load(args)
    results = generate(model, processor, samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       use_cache=not args.no_cache, progress=not args.json)
    _report(args, model, config, results)


def cmd_visualize(args) -> None:
    from ivtp.inference import generate

    samples = _samples_from_args(args)
    model, processor, config = _load(args)
    results = generate(model, processor, samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    paths = _write_overlays(results, model, args.out, "overlay_")
    _report(args, model, config, results, {"overlays": paths})


def cmd_convert(args) -> None:
    from ivtp.convert import convert_original_llava

    out = convert_original_llava(args.src, args.out, clip=args.clip, dtype=_dtype(args.dtype))
    print(f"wrote llava-hf checkpoint to {out}")


def cmd_data_check(args) -> int:
    from transformers import AutoTokenizer

    from ivtp.data.check import check_file, format_report

    image_tokens = args.image_tokens
    if args.model is not None:  # its placeholder count (LLaVA-NeXT: each image's, by its size), from config.json
        from ivtp.data.llava import placeholders_per_image
        from ivtp.models import PRESETS, architecture

        config = architecture(args.model, args.model in PRESETS)
        if config is None:
            raise InputError(f"{args.model}: its config.json is not in the HF cache; download it, or use a preset")
        image_tokens = placeholders_per_image(config)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or TINY_TOKENIZER)
    report = check_file(args.data, args.image_folder, tokenizer, template=args.template,
                        image_tokens=image_tokens, model_max_length=args.model_max_length,
                        progress=not args.json)
    if args.json:
        _print_json(report.to_json())
    else:
        print(format_report(report))
    return 0 if report.ok else 1


def cmd_flops(args) -> int:
    from ivtp import PruneConfig
    from ivtp.eval.bench import method_flops
    from ivtp.models import PRESETS, architecture, preset_config

    if args.model in PRESETS and args.model != "tiny-random":
        config = preset_config(args.model, vocab_size=32064)  # priced with the llava-hf checkpoints' vocabulary
    else:
        config = architecture(args.model)  # a llava-hf folder or cached hub id: dimensions only
        if config is None:
            raise InputError(f"{args.model}: its config.json is not in the HF cache; download it, or use a preset")
    from ivtp.anyres import PRICED_IMAGE_SIZE, is_anyres

    next_model = is_anyres(config)
    if args.image_size is not None and not next_model:
        raise InputError(f"--image-size prices LLaVA-NeXT's AnyRes crops; {args.model} is a LLaVA-1.5, which "
                         "resizes every image to its tower's size")
    if args.projector != "mlp":
        if next_model:
            raise InputError(f"--projector {args.projector}: the trained compressors are LLaVA-1.5's")
        return _compressor_flops(args, config)
    args.method = args.method or "ivtp"
    prune = None if args.method == "none" else (
        PruneConfig.load(args.prune_config) if args.prune_config else PruneConfig.for_method(args.method,
                                                                                          args.visual_tokens))
    image_size = (args.image_size or PRICED_IMAGE_SIZE) if next_model else None
    result = method_flops(config, prune, args.text_tokens, image_size=image_size)
    result = {"model": args.model, "method": args.method, "text_tokens": args.text_tokens,
              **({"image_size": list(image_size)} if image_size else {}), **result}
    if args.json:
        _print_json(result)
    else:
        crops = (f" ({image_size[0]}x{image_size[1]} px: {result['crops']} crops, visual tokens are per image)"
                 if image_size else "")
        print(f"{args.model} {args.method}: ViT {result['vit']:.3f} + LLM {result['llm']:.3f} + extra "
              f"{result['extra']:.3f} = {result['total']:.3f} TFLOPs; visual tokens reaching the last LLM layer "
              f"{result['final_visual_tokens']}, layer-averaged {result['llm_equivalent_visual_tokens']:.1f}{crops}")
    return 0


def _compressor_flops(args, config) -> int:
    """`ivtp flops --projector NAME`: the unpruned model with a trained compressor in place of its projector."""
    from ivtp.eval.flops import Arch, compressor_llava_flops

    if args.prune_config or args.method not in (None, "none"):
        raise InputError(f"--projector {args.projector} sets the visual tokens itself: it prices the unpruned "
                         "model (--method none, no --prune-config)")
    args.method = "none"
    try:
        result = compressor_llava_flops(Arch.from_llava_config(config), args.projector, args.text_tokens,
                                        args.visual_tokens)
    except ValueError as e:  # a budget that is not a grid
        raise InputError(f"--projector {args.projector}: {e}") from None
    result = {"model": args.model, "method": "none", "projector": args.projector,
              "visual_tokens": args.visual_tokens, "text_tokens": args.text_tokens, **result}
    if args.json:
        _print_json(result)
    else:
        print(f"{args.model} {args.projector}@{args.visual_tokens}: ViT {result['vit']:.3f} + LLM "
              f"{result['llm']:.3f} + extra {result['extra']:.3f} = {result['total']:.3f} TFLOPs; visual tokens in the LLM "
              f"{result['final_visual_tokens']} (its readout MLP, {result['readout']:.4f}, is left out as LLaVA's "
              "projector is)")
    return 0


def cmd_bench(args) -> int:
    import torch

    from ivtp.eval.bench import bench

    torch.set_num_threads(args.threads) if args.threads else None
    result = bench(args.preset, args.method, args.visual_tokens, device=_device(args),
                   dtype=_dtype(args.dtype) or torch.float32, new_tokens=args.new_tokens,
                   repeats=args.repeats, progress=not args.json, allocator=args.allocator,
                   attn_implementation=args.attn_implementation, batch_size=args.batch_size, trace=args.trace,
                   compile=_compile(args))
    if args.json:
        _print_json(result)
    else:
        overhead = result["scoring_overhead"]
        lo, hi = result["speedup_prefill_paired_quartiles"]
        print(f"{args.preset} {args.method}@{args.visual_tokens} batch {args.batch_size}: "
              f"prefill x{result['speedup_prefill']:.2f} "
              f"(back-to-back pairs: quartiles x{lo:.2f}-x{hi:.2f}; "
              f"FLOPs predict x{result['flops_speedup']:.2f}, {100 * result['prefill_vs_flops']:.0f}%), decode "
              f"x{result['speedup_decode']:.2f}, KV cache x{result['kv_cache_ratio']:.2f}"
              + (f", scoring {100 * overhead['scoring_share']:.1f}% of pruned prefill" if overhead else ""))
        vit, llm = result["stages"]["before_llm"], result["stages"]["llm"]
        print(f"  before the LLM (tower, projector, aligner): x{vit['speedup']:.2f} (ViT FLOPs "
              f"x{vit['flops_speedup_vit']:.2f}); LLM decoder: x{llm['speedup']:.2f} (LLM FLOPs "
              f"x{llm['flops_speedup_llm']:.2f})")
        compiled = result["compile"]
        if compiled:
            print(f"  compiled ({compiled['backend']}, mode {compiled['mode']}): pruned prefill "
                  f"x{compiled['speedup_prefill_vs_stock_eager']:.2f} against stock eager, "
                  f"x{compiled['speedup_prefill_vs_stock_compiled']:.2f} against stock compiled "
                  f"({100 * compiled['prefill_vs_flops_compiled']:.0f}% of the FLOPs speedup); stock compiled is "
                  f"x{compiled['stock_compiled_vs_eager']:.2f} its eager self; compile "
                  f"{compiled['compile_s']['pruned']:.0f} s (pruned), {compiled['compile_s']['unpruned']:.0f} s (stock)")
    return 0


def _eval_run(args, config, bench) -> dict:
    """What produced the predictions; a resumed run must match it (ivtp/eval/runner.py)."""
    model_id = os.path.basename(os.path.normpath(args.model)) + "-" + (config.method if config else "unpruned")
    return {"benchmark": args.benchmark, "model": args.model, "model_id": args.model_id or model_id,
            "prune_config": None if config is None else config.to_dict(), "max_new_tokens": args.max_new_tokens or bench.max_new_tokens,
            "image_aspect_ratio": args.image_aspect_ratio, "random_weights": args.random_weights}


def _eval_aspect_ratio(args) -> str:
    """--image-aspect-ratio, or the model's own (LLaVA-NeXT: anyres; LLaVA-1.5: pad), read from its config.json
    before any weights load; a choice the model cannot honour is a one-line error."""
    from ivtp.data.llava import resolve_aspect_ratio
    from ivtp.models import architecture

    config = architecture(args.model, args.random_weights)  # None: a hub id not cached yet, taken as LLaVA-1.5
    chosen = {"none": "crop"}.get(args.image_aspect_ratio, args.image_aspect_ratio)  # eval's name for crop
    resolved = resolve_aspect_ratio(chosen, config)
    return args.image_aspect_ratio or resolved


def _shard(args) -> tuple[int, int]:
    """--num-chunks/--chunk-idx, or one chunk per process under torchrun (WORLD_SIZE/RANK)."""
    if args.num_chunks is not None:
        if args.chunk_idx >= args.num_chunks:
            raise InputError(f"--chunk-idx {args.chunk_idx} is not a chunk of --num-chunks {args.num_chunks} "
                             f"(0 to {args.num_chunks - 1})")
        return args.num_chunks, args.chunk_idx
    if args.chunk_idx:
        raise InputError("--chunk-idx needs --num-chunks (under torchrun each process takes its RANK's chunk)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and _device(args).startswith("cuda"):
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return world, int(os.environ.get("RANK", "0"))


def cmd_eval(args) -> int:
    from ivtp.eval.benchmarks import get_benchmark
    from ivtp.eval.runner import check_run, evaluate, finish, load_items

    bench = get_benchmark(args.benchmark)
    num_chunks, chunk_idx = _shard(args)
    out = args.out or os.path.join("ivtp_out", "eval", bench.name)
    items = load_items(bench, args.data, args.limit)  # a bad folder fails before the model loads
    if args.score_only:
        with open(os.path.join(out, "run.json")) as f:
            run = json.load(f)
        result = finish(bench, args.data, items, out, num_chunks, run)
        if result is None:
            raise FileNotFoundError(f"{out}: predictions are missing for some questions; run the missing chunks")
        summary = {"out": out, "result": result}
    else:
        config = _prune_config(args)
        args.image_aspect_ratio = _eval_aspect_ratio(args)
        run = _eval_run(args, config, bench)
        check_run(out, run)  # a mismatched resume fails before the model loads
        model, processor, config = _load(args, config)
        summary = evaluate(model, processor, bench, args.data, out, run, items=items, num_chunks=num_chunks,
                           chunk_idx=chunk_idx, batch_size=args.batch_size,
                           pad=args.image_aspect_ratio == "pad", progress=not args.json,
                           on_bad_image=args.on_bad_image)
    if args.json:
        json.dump(summary, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    elif summary["result"] is None:
        print(f"chunk {chunk_idx + 1}/{num_chunks} done ({summary['answered_now']} answered); results.json is "
              "written when the last chunk finishes")
    else:
        result = summary["result"]
        print(f"{result['title']}: {json.dumps(result['metrics'], ensure_ascii=False)}")
        if "skipped" in result:
            print(f"skipped {result['skipped']['questions']} question(s) with unreadable images, scored as wrong: "
                  f"{', '.join(result['skipped']['question_ids'][:10])}")
        for path in result["files"]:
            print(f"wrote {path}")
    return 0


def cmd_ablate(args) -> int:
    import torch

    from ivtp.testbed.ablate import ablate, headline, write_reports

    suites = [s for s in args.suites.split(",") if s]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(args.testbed, "ablate")
    rows = ablate(args.testbed, out, suites=suites, budgets=budgets, limit=args.limit, batch_size=args.batch_size,
                  pope_images=args.pope_images, progress=not args.json, fresh=args.fresh, finetuned=args.finetuned)
    paths = write_reports(rows, out)
    if args.json:
        _print_json({"rows": [r.__dict__ for r in rows], "files": paths})
    else:
        for r in rows:
            acc, f1 = headline(r)
            print(f"{r.suite:12s} {r.model:10s} {r.name:28s} tokens {str(r.tokens):5s} GQA-layout {acc:5.1f}"
                  + ("" if f1 is None else f"  POPE F1 {f1:5.1f}"))
        print("wrote " + ", ".join(paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ivtp", description="Instruction-guided visual token pruning for LLaVA-1.5")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="prune and answer on the embedded default model and a generated image")
    _model_args(p, "testbed" if os.path.isfile(os.path.join(TESTBED_MODEL, "config.json")) else "tiny-random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ivtp_out")
    p.set_defaults(func=cmd_demo)

    for name, func, helptext in (("generate", cmd_generate, "answer prompts about images, batched"),
                                 ("visualize", cmd_visualize, "write kept-patch overlays for images")):
        p = sub.add_parser(name, help=helptext)
        _model_args(p)
        p.add_argument("--image", action="append", help="image path (repeat; pairs with --prompt; 'none': no image)")
        p.add_argument("--prompt", action="append", help="question (repeat)")
        p.add_argument("--batch-size", type=positive_int, default=8)
        if name == "generate":
            p.add_argument("--no-cache", action="store_true", help="decode without the KV cache (a check)")
        else:
            p.add_argument("--out", default="ivtp_out")
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="run a benchmark of IVTP's Table 1 (docs/evaluation.md): batched, resumable, sharded")
    _model_args(p)
    from ivtp.eval.benchmarks import BENCHMARKS

    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    p.add_argument("--data", required=True, help="the benchmark folder (LLaVA-1.5's playground/data/eval/<name>)")
    p.add_argument("--out", default=None, help="output folder (default ivtp_out/eval/<benchmark>); resumes there")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--num-chunks", type=positive_int, default=None, help="shards (default: torchrun's WORLD_SIZE, or 1)")
    p.add_argument("--chunk-idx", type=non_negative_int, default=0)
    p.add_argument("--image-aspect-ratio", choices=["pad", "none", "anyres"], default=None,
                   help="pad: a square of the mean colour first, as LLaVA-1.5 evaluates (its default); none: the "
                        "processor's own centre crop; anyres: LLaVA-NeXT's tiles (its default and only choice)")
    p.add_argument("--model-id", default=None, help="name used in submission files")
    p.add_argument("--on-bad-image", choices=ON_BAD_IMAGE, default="stop",
                   help="an image that cannot be decoded: stop (naming its question; answers so far are kept) or "
                        "skip it (a blank answer, scored wrong, counted in results.json)")
    p.add_argument("--score-only", action="store_true", help="merge and score existing predictions; no model")
    p.set_defaults(func=cmd_eval, max_new_tokens=None)

    p = sub.add_parser("ablate", help="methods and IVTP ablations on the trained testbed (docs/testbed.md)")
    p.add_argument("--testbed", default="ivtp_out/testbed", help="the output folder of `make testbed`")
    p.add_argument("--out", default=None, help="default: <testbed>/ablate")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="visual tokens per image (of 64) for the methods suite")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N questions of the GQA-layout split")
    p.add_argument("--pope-images", type=positive_int, default=100, help="POPE-layout images (each with its 3 settings)")
    p.add_argument("--fresh", type=positive_int, default=None, metavar="N",
                   help="GQA-layout questions of a new split of N images (written under --out) instead of the "
                        "testbed's: for reporting settings chosen on the testbed's own split")
    p.add_argument("--finetuned", default=None, metavar="PATH",
                   help="the model the suites prune in pure inference (default <testbed>/llava)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (two 1-thread sweeps beat one 2-thread)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("flops", help="TFLOPs of a model and method, in the IVTP paper's convention (docs/flops.md)")
    p.add_argument("--model", default="llava-1.5-7b", help="a preset (llava-1.5-7b, llava-1.6-7b, cpu-mid, ...) or a "
                                                          "llava-hf folder")
    p.add_argument("--method", default=None, help="a method name, or none for the unpruned model (default ivtp; "
                                                  "none with --projector)")
    p.add_argument("--visual-tokens", type=positive_int, default=64, help="final visual tokens per image (budget)")
    p.add_argument("--text-tokens", type=positive_int, default=512)
    p.add_argument("--prune-config", default=None, help="a prune config instead of --method/--visual-tokens")
    p.add_argument("--image-size", type=image_size, default=None, metavar="HxW",
                   help="LLaVA-NeXT only: the image's height x width in px, which sets its AnyRes crops "
                        "(default 672x672: 5 crops); budgets are per crop unless the config sets "
                        "anyres.budget: per_image (docs/paper.md, LLaVA-NeXT)")
    p.add_argument("--projector", choices=PROJECTOR_NAMES, default="mlp",
                   help="a trained compressor in place of LLaVA's projector, at --visual-tokens (unpruned: "
                        "--method none); its own FLOPs go to 'extra'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("bench", help="prefill latency, decode speed and memory: pruned against unpruned")
    p.add_argument("--preset", default="cpu-mid", help="cpu-mid (CPU, minutes), llava-1.5-7b (GPU), tiny-random")
    p.add_argument("--method", default="ivtp")
    p.add_argument("--visual-tokens", type=positive_int, default=64)
    p.add_argument("--device", default=None, help="cuda if one is available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None)
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--allocator", choices=ALLOCATORS, default="steady",
                   help="on a CPU, 'steady' keeps freed memory for reuse so that neither model pays page faults for "
                        "its activations (docs/benchmarks.md); 'default' leaves glibc's malloc as it is")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="prompts per prefill (each with its own scene); on a GPU, 1 is bound by kernel launches")
    p.add_argument("--attn-implementation", default="sdpa",
                   help="sdpa (on a GPU its flash kernel where no mask is needed), eager, flash_attention_2")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="write a Chrome trace of one profiled pruned prefill (IVTP's scoring in labelled ranges)")
    _compile_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    data = sub.add_parser("data", help="training data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="report missing or unreadable images, malformed and over-long samples")
    p.add_argument("data", help="LLaVA JSON file")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer (model folder or hub id in the cache) for lengths; "
                                                     "default: the tiny test tokenizer")
    p.add_argument("--template", default="vicuna_v1", choices=["vicuna_v1", "plain"])
    p.add_argument("--image-tokens", type=positive_int, default=576, help="placeholders per image (576 for LLaVA-1.5)")
    p.add_argument("--model", default=None, help="count each image's placeholders as this model does (a preset or "
                                                 "llava-hf folder; LLaVA-NeXT: by the image's size), not --image-tokens")
    p.add_argument("--model-max-length", type=positive_int, default=2048)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("convert", help="convert an original LLaVA-1.5 or 1.6 (Vicuna) checkpoint to the llava-hf layout")
    p.add_argument("src", help="folder of the original checkpoint (config.json with mm_* keys)")
    p.add_argument("out", help="output folder")
    p.add_argument("--clip", default=None, help="CLIP vision tower (default: the config's mm_vision_tower)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None)
    p.set_defaults(func=cmd_convert)
    return parser


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit code 2) instead of the usage block above it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "a whole number of at least 1")  # counts: batch size, tokens, questions
non_negative_int = _int_at_least(0, "a whole number of at least 0")  # indices


def image_size(text: str) -> tuple[int, int]:
    """'HxW' in px (e.g. 672x1008) -> (height, width)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in px, such as 672x1008, got {text!r}")
    return int(parts[0]), int(parts[1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_input_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
