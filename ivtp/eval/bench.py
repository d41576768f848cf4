"""`ivtp bench`: latency and memory of a pruned model against the unpruned one, measured in the same run.

For one image and a realistic prompt it measures
- prefill latency (time to first token: the vision tower, the projector and the LLM over the prompt), and the
  share of it inside the LLM decoder, so that a gap to the FLOPs prediction can be placed,
- decode speed (tokens per second over a fixed number of new tokens, after prefill),
- the KV cache the prefill leaves (bytes), and on a GPU the peak memory a prefill adds to the resident weights,
for the stock model and for the same weights pruned, and reports the ratios beside the FLOPs-predicted prefill
speedup (ivtp/eval/flops.py). For IVTP it also prices its own scoring (rollouts, pseudo-CLS, aligner) as a share
of the pruned prefill, from the profiler ranges the patches label "ivtp.score" and "ivtp.guidance".
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import math
import resource
import statistics
import sys
import time

import torch
from tqdm import tqdm

from ivtp.config import PruneConfig
from ivtp.data.shapes import draw_scene
from ivtp.data.templates import vicuna_v1_prompt
from ivtp.eval.flops import Arch, llava_flops
from ivtp.names import ALLOCATORS  # noqa: F401 (re-exported)

QUESTION = ("Look at the shapes in this picture. Which colour is the circle nearest to the top left corner, and "
            "is there a square of the same colour anywhere else in the image?")
SCORING_RANGES = ("ivtp.score", "ivtp.guidance")
UNPRUNED = {"vision": {"enabled": False}, "llm": {"enabled": False}}  # a PruneConfig that passes every token on


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel. Process-wide and
    for the rest of the process; returns whether it took (False off glibc).

    By default glibc serves large blocks with mmap and trims the heap on free, so every forward pass maps its big
    activations afresh and pays one page fault per 4 KiB page on first touch. On the 2-core CPU machine the cpu-mid
    unpruned prefill took about 80,000 minor faults (some 320 MB) against 1,700 for a 64-token pruned one, and at
    2 threads the faults, serialised in the kernel, added about a quarter to the unpruned time: a speedup that
    comes from the allocator, not from the pruning. A CPU deployment avoids them the same way (or with jemalloc or
    tcmalloc), so the bench measures with them avoided.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    # Older glibc caps the mmap threshold at 32 MiB (64-bit); blocks above it stay mapped, which are few here.
    mmap = mallopt(_M_MMAP_THRESHOLD, 2**30) or mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
    return bool(trim and mmap)


def _minor_faults() -> int:
    """Minor page faults of this process so far, all threads."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _quartiles(values: list[float]) -> list[float]:
    """[first, third] quartile (one value: itself twice)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def _kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _DecoderClock:
    """Seconds spent inside the LLM decoder (model.model.language_model) during one call, from forward hooks: the
    rest of a prefill is the vision tower, the projector, the aligner and the embedding merge."""

    def __init__(self, model, device):
        self.device, self.seconds, self._start = device, 0.0, None
        decoder = model.model.language_model
        self._handles = [decoder.register_forward_pre_hook(self._enter), decoder.register_forward_hook(self._leave)]

    def _enter(self, *_):
        _sync(self.device)
        self._start = time.perf_counter()

    def _leave(self, *_):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._start

    def remove(self):
        for h in self._handles:
            h.remove()


class _Subject:
    """One model under measurement, with the inputs of the prefill it is timed on. `prefill_fn`: what runs the
    prefill instead of the model (the stock model's compiled forward); decode steps run the model itself."""

    def __init__(self, model, inputs: dict, prefill_fn=None):
        self.model, self.inputs = model, inputs
        self.prefill_fn = model if prefill_fn is None else prefill_fn
        # A compiled prefill is one graph: no hook can clock the decoder inside it.
        state = getattr(model, "ivtp_state", None)
        self.clocked = prefill_fn is None and getattr(state, "compiled", None) is None
        self.first_s: float | None = None  # the first prefill: for a compiled one, the compile
        self.device = next(model.parameters()).device
        self.times: list[float] = []  # prefill seconds, per repeat
        self.llm_times: list[float] = []  # of which inside the LLM decoder
        self.faults: list[int] = []  # minor page faults per prefill, all threads of the process
        self.decode_times: list[float] = []

    def prefill(self):
        return self.prefill_fn(**self.inputs, use_cache=True, logits_to_keep=1)

    def time_prefill(self) -> None:
        clock = _DecoderClock(self.model, self.device) if self.clocked else None
        faults = _minor_faults()
        try:
            self.times.append(_timed(self.prefill, self.device))
        finally:
            if clock is not None:
                clock.remove()
        self.faults.append(_minor_faults() - faults)
        self.llm_times.append(clock.seconds if clock is not None else math.nan)

    def time_decode(self, new_tokens: int) -> None:
        # Greedy steps on the cache the prefill left, one token at a time: the decode cost alone.
        step = self.prefill()
        cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            step = self.model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
        _sync(self.device)
        self.decode_times.append(time.perf_counter() - start)

    def memory(self) -> tuple[int, int | None]:
        """KV-cache bytes a prefill leaves, and on a GPU the peak memory one prefill adds to what is already
        allocated (the weights of every model in the run): the activations and the cache, which pruning shrinks."""
        resident = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            resident = torch.cuda.memory_allocated(self.device)
        out = self.prefill()
        peak = torch.cuda.max_memory_allocated(self.device) - resident if resident is not None else None
        return _kv_bytes(out.past_key_values), peak


@torch.no_grad()
def measure(models: dict, inputs: dict, new_tokens: int, repeats: int, prompt_len: int,
            prefill_fns: dict | None = None) -> dict:
    """For each named model: median prefill seconds over `repeats` (after a warm-up, whose time is reported apart:
    for a compiled prefill it holds the compile), split into the LLM decoder and what runs before it (not inside a
    compiled graph: nan); decode tokens/s; KV-cache bytes; peak memory on a GPU. prefill_fns: per name, what runs
    that model's prefill instead of the model (a compiled forward).

    The models take turns (A B A B ...), so that a machine whose speed drifts during the run (shared cores,
    clock changes: on the 2-core CPU the unpruned prefill alone varied by up to 35% between runs) shifts all of them
    alike; blocks of repeats per model would turn such drift into a false speedup or slowdown.
    """
    subjects = {name: _Subject(model, inputs, (prefill_fns or {}).get(name)) for name, model in models.items()}
    for sub in subjects.values():
        sub.first_s = _timed(sub.prefill, sub.device)  # warm-up: allocator, kernels, lazy init, a compile
    memory = {name: sub.memory() for name, sub in subjects.items()}
    for _ in range(repeats):
        for sub in subjects.values():
            sub.time_prefill()
    for _ in range(repeats):
        for sub in subjects.values():
            sub.time_decode(new_tokens)
    out, rows = {}, inputs["input_ids"].shape[0]
    for name, sub in subjects.items():
        kv, peak = memory[name]
        out[name] = {"prefill_s": statistics.median(sub.times), "prefill_runs_s": sub.times,
                     "prefill_llm_s": statistics.median(sub.llm_times),
                     "prefill_before_llm_s": statistics.median(t - llm for t, llm in zip(sub.times, sub.llm_times)),
                     "prefill_page_faults": statistics.median(sub.faults),
                     "decode_tokens_per_s": rows * new_tokens / statistics.median(sub.decode_times),
                     "kv_cache_bytes": kv, "prefill_peak_memory_bytes": peak, "prompt_tokens": prompt_len,
                     "first_prefill_s": sub.first_s}
    return out


@torch.no_grad()
def scoring_share(model, inputs: dict, trace: str | None = None) -> dict:
    """Seconds spent in the labelled IVTP scoring ranges during one pruned prefill, and their share of it.
    `trace`: also write the profile there as a Chrome trace (chrome://tracing, Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        total = _timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device)
    if trace is not None:
        prof.export_chrome_trace(trace)
    spent = 0.0
    for event in prof.events():
        if event.name in SCORING_RANGES:
            # The ranges do not nest in one another, so their totals add up. On a GPU the device time counts.
            us = event.device_time_total if device.type == "cuda" and event.device_time_total else event.cpu_time_total
            spent += us / 1e6
    return {"scoring_s": spent, "profiled_prefill_s": total, "scoring_share": spent / total if total else None}


def text_encoder_of(aligner):
    """The dimensions of an aligner's CLIP text tower, for pricing it."""
    from ivtp.eval.flops import TextEncoder

    t = aligner.text.transformer
    block = t.resblocks[0]
    proj = aligner.text.text_projection
    return TextEncoder(hidden=t.width, intermediate=block.mlp.c_fc.out_features, layers=len(t.resblocks),
                       heads=block.attn.num_heads, context=aligner.context_length,
                       embed_dim=proj.out_features if hasattr(proj, "out_features") else proj.shape[1])


def method_flops(llava_config, prune_config: PruneConfig | None, text_tokens: int, text_encoder=None,
                 image_size: tuple[int, int] | None = None) -> dict:
    """The paper's FLOPs convention (docs/flops.md) for a model config pruned by `prune_config` (None: unpruned).

    Priced from the plans alone, without weights. `extra` holds what IVTP adds outside the two towers: the CLIP
    text tower on the instruction (guidance 'clip'; CLIP ViT-L/14's unless `text_encoder` says otherwise) and the
    in-LLM rollouts over {visual tokens, pseudo-CLS}. image_size: (height, width) of the image, which sets
    LLaVA-NeXT's crops and stock token count (default anyres.PRICED_IMAGE_SIZE); LLaVA-1.5 takes none.
    """
    from ivtp.anyres import PRICED_IMAGE_SIZE, crop_count
    from ivtp.eval.flops import TERA, TextEncoder, extra_flops_clip_text, extra_flops_rollout
    from ivtp.methods import build_llm_plan
    from ivtp.patch.llava import FixedLayout, image_layout, make_plans

    arch = Arch.from_llava_config(llava_config)
    config = prune_config if prune_config is not None else PruneConfig.from_dict(UNPRUNED)
    runner, plan = make_plans(config, llava_config)
    # Per image: the tower's passes, and the visual tokens each layer of the LLM holds (stage 2 counts crops).
    layout = image_layout(config, llava_config, runner, plan)
    sizes = None if isinstance(layout, FixedLayout) else [image_size or PRICED_IMAGE_SIZE]
    crops = 1 if sizes is None else crop_count(sizes[0], llava_config)
    full = int(layout.counts(1, sizes)[0])
    handed_on = layout.expected(sizes[0] if sizes else None)  # NeXT's stock layout of the kept: its mean
    if layout.units_are_images and layout.stock and plan is not None:  # per-image counts of this image's own tokens
        plan = build_llm_plan(config, arch.llm_layers, handed_on)
    budgets = layout.crop_budgets(crops) if sizes else [runner.tokens_per_image]
    per_unit = plan.tokens_per_layer(arch.llm_layers) if plan is not None else [runner.tokens_per_image] * arch.llm_layers
    # handed_on is per_unit[0] x crops, or NeXT's stock count, of which an in-LLM stage keeps its budget's share
    llm = [round(n * handed_on / per_unit[0]) for n in per_unit]
    if prune_config is None:
        return {**llava_flops(arch, text_tokens, llm_visual_per_layer=[full] * arch.llm_layers, crops=crops),
                "final_visual_tokens": full}
    extra = 0
    if prune_config.uses_llm_stage:
        stage = prune_config.llm
        scored = [n + 1 for n in llm[: stage.layers]]  # visual tokens plus the pseudo-CLS query
        extra += extra_flops_rollout(arch.llm_hidden, scored, stage.effective_group_size)
        if stage.needs_aligner:
            extra += extra_flops_clip_text(text_encoder or TextEncoder.clip_vit_l14(), min(text_tokens, 75))
    out = llava_flops(arch, text_tokens, llm_visual_per_layer=llm, extra=extra / TERA, crops=crops,
                      crop_vit_tokens=[runner.at(b).vit_tokens_per_layer() for b in budgets])
    out["llm_visual_per_layer"] = llm
    out["final_visual_tokens"] = llm[-1]
    return out


def predicted_flops(model, text_tokens: int, image_size: tuple[int, int] | None = None) -> dict:
    """method_flops for a loaded model: unpruned, or as its ivtp_state prunes it."""
    state = getattr(model, "ivtp_state", None)
    if state is None:
        return method_flops(model.config, None, text_tokens, image_size=image_size)
    encoder = text_encoder_of(state.aligner) if state.aligner is not None else None
    return method_flops(model.config, state.config, text_tokens, encoder, image_size=image_size)


def subjects(preset: str, config: PruneConfig, device: str = "cpu", dtype: torch.dtype = torch.float32,
             attn_implementation: str = "sdpa", batch_size: int = 1, compile=None):
    """What the bench measures: the preset with random weights, a copy of it pruned by `config`, and the inputs of
    one prefill: `batch_size` drawn scenes, each with the vicuna_v1 prompt of QUESTION (rows of equal length, so
    no padding).

    The aligner is the preset's own (cpu-mid, tiny-random) or, for the llava-1.5 presets, the config's aligner
    architecture with random weights: its cost does not depend on its weights, and a GPU machine without the
    OpenAI CLIP weights in its cache can then still measure."""
    from ivtp import apply_pruning
    from ivtp.models import preset_aligner, random_model, tiny_aligner

    if batch_size < 1:  # before any model is built
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    stock, processor = random_model(preset, dtype=dtype, device=device, attn_implementation=attn_implementation)
    pruned = copy.deepcopy(stock)
    aligner = preset_aligner(preset)
    if aligner is None and config.needs_aligner:
        aligner = tiny_aligner(model=config.llm.aligner.model)
    apply_pruning(pruned, config, aligner=aligner, tokenizer=processor.tokenizer, compile=compile)
    from ivtp.anyres import PRICED_IMAGE_SIZE, is_anyres

    # LLaVA-NeXT: a square image at the size flops prices (5 crops); LLaVA-1.5: one at the tower's own size.
    size = PRICED_IMAGE_SIZE[0] if is_anyres(stock.config) else stock.config.vision_config.image_size
    images = [draw_scene(seed=seed, size=size)[0] for seed in range(batch_size)]
    inputs = processor(images=images, text=[vicuna_v1_prompt(QUESTION)] * batch_size, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return stock, pruned, inputs


def bench(preset: str, method: str, visual_tokens: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
          new_tokens: int = 16, repeats: int = 3, progress: bool = True, allocator: str = "steady",
          attn_implementation: str = "sdpa", batch_size: int = 1, trace: str | None = None, compile=None) -> dict:
    """Build the preset with random weights, prune a copy with `method` at `visual_tokens`, measure both.

    allocator: 'steady' (on a CPU, see `steady_allocator`; it changes this process's malloc for good) or 'default'
    (glibc's own behaviour, page faults and all). batch_size: prompts per prefill. On a GPU one prompt leaves the
    7B model bound by the host's kernel launches, not by its FLOPs (docs/benchmarks.md); a batch shows the regime
    where the FLOPs decide. Decode tokens/s then counts the tokens of all rows. trace: write a Chrome trace of one
    profiled pruned prefill to this path, with IVTP's scoring in the ranges "ivtp.score" and "ivtp.guidance" (the
    profiler adds host time to every operation: on an H100 a batch-16 7B prefill took 294 ms profiled against
    168 ms without, so read a trace for where time goes, not for how much). compile: the pruned model's prefill
    as one compiled graph (ivtp.compiled.CompileOptions or its dict); the stock model is then also measured with
    its prefill compiled the same way ("unpruned_compiled"), and each compiled prefill's first call (the compile)
    is reported apart from the steady state. Inside one graph nothing can time the decoder or the scoring ranges:
    those splits are left out.
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, not {allocator!r}")
    steady = allocator == "steady" and torch.device(device).type == "cpu" and steady_allocator()

    from ivtp.compiled import CompileOptions

    config = PruneConfig.for_method(method, visual_tokens)
    options = CompileOptions.resolve(compile)
    stock, pruned, inputs = subjects(preset, config, device, dtype, attn_implementation, batch_size, options)
    text_tokens = int((inputs["input_ids"][0] != stock.config.image_token_id).sum())
    image_size = inputs["image_sizes"][0].tolist() if "image_sizes" in inputs else None  # LLaVA-NeXT's

    steps = tqdm(total=2, desc=f"bench {preset} {method}@{visual_tokens}", disable=not progress)
    models, prefill_fns = {"unpruned": stock, "pruned": pruned}, {}
    if options is not None:  # the stock prefill compiled as the pruned one is (the fair comparison); pruned eager
        from ivtp import apply_pruning

        state = pruned.ivtp_state
        models["pruned_eager"] = apply_pruning(copy.deepcopy(stock), config, aligner=state.aligner,
                                               tokenizer=state.tokenizer)
        models["unpruned_compiled"] = stock
        prefill_fns["unpruned_compiled"] = torch.compile(stock, fullgraph=True, dynamic=False,
                                                         backend=options.backend, mode=options.mode)
    runs = measure(models, inputs, new_tokens, repeats, inputs["input_ids"].shape[1], prefill_fns)
    base, ours = runs["unpruned"], runs["pruned"]
    steps.update()
    scored = method in ("ivtp", "topk+", "tome+") and options is None
    profiled = scoring_share(pruned, inputs, trace) if scored or trace else None
    overhead = profiled if scored else None
    steps.update()
    steps.close()

    f_base, f_ours = predicted_flops(stock, text_tokens, image_size), predicted_flops(pruned, text_tokens, image_size)
    paired = [a / b for a, b in zip(base["prefill_runs_s"], ours["prefill_runs_s"])]
    return {
        "preset": preset, "method": method, "visual_tokens": visual_tokens, "device": device,
        "dtype": str(dtype).replace("torch.", ""), "attn_implementation": attn_implementation,
        "batch_size": batch_size, "text_tokens": text_tokens, "new_tokens": new_tokens, "image_size": image_size,
        "threads": torch.get_num_threads(), "allocator": "steady" if steady else "default",
        "prune_config": config.to_dict(),
        "unpruned": base, "pruned": ours,
        "speedup_prefill": base["prefill_s"] / ours["prefill_s"],
        # the median over repeats of unpruned / pruned measured back to back: less sensitive to drift
        "speedup_prefill_paired": statistics.median(paired),
        # how far those back-to-back ratios spread (quartiles): on a shared CPU this is the run's noise
        "speedup_prefill_paired_quartiles": _quartiles(paired),
        "speedup_decode": ours["decode_tokens_per_s"] / base["decode_tokens_per_s"],
        "kv_cache_ratio": ours["kv_cache_bytes"] / base["kv_cache_bytes"],
        # on a GPU: the memory a prefill adds to the resident weights, pruned over unpruned
        "prefill_memory_ratio": (ours["prefill_peak_memory_bytes"] / base["prefill_peak_memory_bytes"]
                                 if base["prefill_peak_memory_bytes"] else None),
        "flops_unpruned_tflops": f_base["total"], "flops_pruned_tflops": f_ours["total"],
        "flops_speedup": f_base["total"] / f_ours["total"],
        "prefill_vs_flops": (base["prefill_s"] / ours["prefill_s"]) / (f_base["total"] / f_ours["total"]),
        "llm_equivalent_visual_tokens": f_ours["llm_equivalent_visual_tokens"],
        # Where the gap to the FLOPs prediction sits: the part before the LLM (vision tower with stage 1, projector,
        # aligner) against the ViT's FLOPs, and the LLM decoder (with stage 2's scoring) against the LLM's.
        "stages": {
            "before_llm": {"unpruned_s": base["prefill_before_llm_s"], "pruned_s": ours["prefill_before_llm_s"],
                           "speedup": base["prefill_before_llm_s"] / ours["prefill_before_llm_s"],
                           "flops_speedup_vit": f_base["vit"] / f_ours["vit"]},
            "llm": {"unpruned_s": base["prefill_llm_s"], "pruned_s": ours["prefill_llm_s"],
                    "speedup": base["prefill_llm_s"] / ours["prefill_llm_s"],
                    "flops_speedup_llm": f_base["llm"] / f_ours["llm"]},
        },
        "scoring_overhead": overhead,
        "trace": trace,
        "compile": None if options is None else _compiled_figures(runs, options, f_base["total"] / f_ours["total"]),
    }


def _compiled_figures(runs: dict, options, flops_speedup: float) -> dict:
    """The compiled pruned prefill against the stock one eager and compiled, and what each compile cost."""
    base, stock, ours, eager = runs["unpruned"], runs["unpruned_compiled"], runs["pruned"], runs["pruned_eager"]
    return {"backend": str(options.backend), "mode": options.mode, "bucket": options.bucket,
            "unpruned_compiled": stock, "pruned_eager": eager,
            "compiled_vs_eager_pruned": eager["prefill_s"] / ours["prefill_s"],
            "speedup_prefill_eager": base["prefill_s"] / eager["prefill_s"],
            "speedup_prefill_vs_stock_eager": base["prefill_s"] / ours["prefill_s"],
            "speedup_prefill_vs_stock_compiled": stock["prefill_s"] / ours["prefill_s"],
            "stock_compiled_vs_eager": base["prefill_s"] / stock["prefill_s"],
            "prefill_vs_flops_compiled": stock["prefill_s"] / ours["prefill_s"] / flops_speedup,
            "compile_s": {"pruned": ours["first_prefill_s"] - ours["prefill_s"],
                          "unpruned": stock["first_prefill_s"] - stock["prefill_s"]}}
