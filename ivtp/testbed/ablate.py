"""`ivtp ablate`: accuracy of every method and IVTP ablation on the testbed's held-out splits (docs/testbed.md).

Each row is one prune config evaluated with `ivtp eval`'s runner on the GQA-layout and POPE-layout splits that
`ivtp.data.shapes.generate_testbed` writes; predictions are kept under <out>/runs, so an interrupted or extended
sweep only runs what is missing. Two baselines frame the methods: no image (a floor: what the question alone
gives) and an oracle that keeps the patches of the object the question is about (a ceiling the generator knows).

Suites:
- methods:     every method at each budget, on the unpruned-trained model; IVTP also on the IVTP-retrained one;
               the trained compressors (ivtp.testbed.projectors), unpruned at their own token count, where trained
- group:       stage-1 group size 1, 2, 3, 4, 6 (IVTP Table 8)
- tau:         the relevance threshold of the pseudo-CLS
- aggregation: how a group's attention rows are combined, in both stages (Tables 4-5)
- guidance:    where stage 2's query comes from (Table 6)
- stages:      vision-only, LLM-only and two-stage at the same final budget (Table 7)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ivtp.data.jsonio import dump_jsonl
from ivtp.methods.peers import PeerRunner
from ivtp.names import DEFAULT_BUDGETS, SUITES  # noqa: F401 (re-exported)
from ivtp.testbed.configs import (BEST_EXTENSION, EXTENSIONS, TESTBED_METHODS, extension_config,
                                  fit_prune_config)

QTYPES = ("colour", "shape", "position", "count", "existence")
MAIN_TOKENS = 7  # 1/9 of the 64 patches: the paper's 576 -> 64


@dataclass
class Row:
    suite: str
    name: str  # what varies, e.g. "topk" or "group_size=2"
    model: str  # "finetuned" (trained unpruned) or "retrained" (trained with IVTP pruning)
    tokens: int | None  # final visual tokens per image (None: unpruned; 0: no image)
    config: dict | None = None  # the prune config, None for the unpruned model and the baselines
    baseline: str | None = None  # "no_image" or "oracle"
    metrics: dict = field(default_factory=dict)
    compare: str | None = None  # a row of the same suite whose kept sets this row's are compared with (Jaccard)
    path: str | None = None  # the model folder that `model` named in this run


class OracleRunner(PeerRunner):
    """Keeps the patches of the object a question is about (the generator knows them), topped up to the budget
    with the patches most similar to [CLS]. `targets` is set before every batch."""

    name = "oracle"

    def __init__(self, section, tower_config, feature_layer):
        super().__init__(section, tower_config, feature_layer)
        self.targets: list[list[int]] = []

    def run(self, tower, pixel_values, want_final_cls):
        def pick(hidden, probe):
            k = self.tokens_per_image
            # topk's criterion for the top-up: cosine similarity of each patch to [CLS] at the feature layer
            scores = torch.nn.functional.cosine_similarity(hidden[:, 1:], hidden[:, :1], dim=-1)  # (B, N)
            rows = []
            for b in range(hidden.shape[0]):
                chosen = list(dict.fromkeys(self.targets[b]))[:k]
                ranked = scores[b].argsort(descending=True).tolist()
                chosen += [i for i in ranked if i not in chosen][: k - len(chosen)]
                rows.append(sorted(chosen))
            return torch.tensor(rows, device=hidden.device)  # (B, K)

        return self._select(tower, pixel_values, want_final_cls, pick)


def plan_rows(suites, budgets, aligner: str, llm_layers: int, retrained: bool,
              projectors: dict[str, int] | None = None) -> list[Row]:
    """Every row of the chosen suites (the prune configs they evaluate). projectors: {name: tokens per image} of
    the trained compressors (methods suite: unpruned, after IVTP retrained at MAIN_TOKENS, else last)."""
    def cfg(method, k, **over):
        return fit_prune_config(method, k, llm_layers, aligner=aligner, **over).to_dict()

    rows: list[Row] = []
    if "methods" in suites:
        from ivtp.testbed.projectors import model_dir

        trained = [Row("methods", name, model_dir(name), n) for name, n in (projectors or {}).items()]
        rows += [Row("methods", "unpruned", "finetuned", None), Row("methods", "no_image", "finetuned", 0,
                                                                     baseline="no_image")]
        for k in budgets:
            rows.append(Row("methods", "oracle", "finetuned", k, cfg("topk", k), baseline="oracle"))
            rows += [Row("methods", m, "finetuned", k, cfg(m, k)) for m in TESTBED_METHODS]
            if retrained:
                rows.append(Row("methods", "ivtp", "retrained", k, cfg("ivtp", k)))
            if k == MAIN_TOKENS:
                rows, trained = rows + trained, []
        rows += trained
    if "group" in suites:
        rows += [Row("group", f"group_size={g}", "finetuned", MAIN_TOKENS, cfg("ivtp", MAIN_TOKENS,
                                                                              vision={"group_size": g}))
                 for g in (1, 2, 3, 4, 6)]
    if "tau" in suites:
        rows += [Row("tau", f"tau={t}", "finetuned", MAIN_TOKENS, cfg("ivtp", MAIN_TOKENS, llm={"tau": t}))
                 for t in (0.0, 0.1, 0.2, 0.3, 0.4)]
    if "aggregation" in suites:
        rows += [Row("aggregation", f"aggregation={a}", "finetuned", MAIN_TOKENS,
                     cfg("ivtp", MAIN_TOKENS, vision={"aggregation": a}, llm={"aggregation": a}))
                 for a in ("rollout", "mean", "max", "multiply", "single_layer", "layer_wise")]
    if "guidance" in suites:
        rows += [Row("guidance", f"guidance={g}", "finetuned", MAIN_TOKENS,
                     cfg("ivtp", MAIN_TOKENS, llm={"guidance": g}), compare="guidance=random" if g != "random" else None)
                 for g in ("clip", "llm_threshold", "all_text", "none", "random")]
    if "extensions" in suites:  # ours, against the paper's form (docs/paper.md, "Extensions")
        for name in EXTENSIONS:
            control = name.split(":")[0] + ":random"
            rows.append(Row("extensions", name, "finetuned", MAIN_TOKENS,
                            extension_config(name, MAIN_TOKENS, llm_layers, aligner).to_dict(),
                            compare=control if name != control else None))
    if "tau_extended" in suites:  # the threshold on the extension's standardised relevance
        for t in (-0.5, 0.0, 0.5, 1.0, 1.5):
            config = extension_config(BEST_EXTENSION, MAIN_TOKENS, llm_layers, aligner).to_dict()
            config["llm"]["tau"] = t
            rows.append(Row("tau_extended", f"{BEST_EXTENSION} tau={t}", "finetuned", MAIN_TOKENS, config))
    if "stages" in suites:
        rows += [Row("stages", "vision_only", "finetuned", MAIN_TOKENS,
                     cfg("ivtp", MAIN_TOKENS, vision={"keep": MAIN_TOKENS}, llm={"enabled": False})),
                 Row("stages", "llm_only", "finetuned", MAIN_TOKENS,
                     cfg("ivtp", MAIN_TOKENS, vision={"enabled": False})),
                 Row("stages", "two_stage", "finetuned", MAIN_TOKENS, cfg("ivtp", MAIN_TOKENS))]
    return rows


def pope_subset(data: str, out: str, images: int) -> str:
    """The POPE-layout split restricted to its first `images` images, all three settings kept (the question
    file lists the settings one after another, so a plain --limit would keep only the first)."""
    src, dst = os.path.join(data, "pope"), os.path.join(out, f"pope_{images}_images")
    if not os.path.isdir(dst):
        os.makedirs(dst)
        with open(os.path.join(src, "llava_pope_test.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        names = set(sorted({r["image"] for r in rows})[:images])
        dump_jsonl([r for r in rows if r["image"] in names], os.path.join(dst, "llava_pope_test.jsonl"))
        for sub in ("coco", "val2014"):
            os.symlink(os.path.abspath(os.path.join(src, sub)), os.path.join(dst, sub))
    return dst


def run_row(row: Row, model_dir: str, data: str, out: str, limit: int | None, batch_size: int,
            pope_images: int = 100) -> dict:
    """Evaluate one row on both splits; returns its metrics (GQA accuracy overall and per question type, POPE)."""
    from ivtp import PruneConfig, apply_pruning
    from ivtp.eval.benchmarks import get_benchmark
    from ivtp.eval.runner import evaluate
    from ivtp.models import load_model, preset_aligner

    model, processor = load_model(model_dir)
    config = None if row.config is None else PruneConfig.from_dict(row.config)
    if config is not None:
        apply_pruning(model, config, aligner=preset_aligner(model_dir), tokenizer=processor.tokenizer)
    state = getattr(model, "ivtp_state", None)
    options: dict = {"use_images": row.baseline != "no_image"}
    if row.baseline == "oracle":
        mc = model.config
        state.vision = OracleRunner(config.topk, mc.vision_config, mc.vision_feature_layer)
        targets = _gqa_targets(data)
        options["before_batch"] = lambda items: setattr(state.vision, "targets",
                                                        [targets.get(it.id, []) for it in items])
    metrics = {}
    for bench_name in ("gqa", "pope"):
        if bench_name == "pope" and (row.baseline == "oracle" or row.suite != "methods"):
            continue  # the oracle: POPE's negatives are about absent objects; ablations: GQA-layout questions
        bench = get_benchmark(bench_name)
        run_dir = row_dir(out, row, bench_name)
        run = {"benchmark": bench_name, "model": model_dir, "prune_config": row.config, "max_new_tokens": 4,
               "image_aspect_ratio": "pad", "baseline": row.baseline}
        root = os.path.join(data, "gqa") if bench_name == "gqa" else pope_subset(data, out, pope_images)
        summary = evaluate(model, processor, bench, root, run_dir, run, limit=limit if bench_name == "gqa" else None,
                           batch_size=batch_size, progress=False, **options)
        result = summary["result"]
        metrics[bench_name] = result["metrics"]
        if bench_name == "gqa":
            metrics["gqa_by_type"] = _by_type(data, run_dir)
            metrics["selection"] = result.get("selection")
            metrics["key_word_hit"] = key_word_hits(data, run_dir)
        metrics["mean_final_visual_tokens"] = result["mean_final_visual_tokens"]
    return metrics


def row_dir(out: str, row: Row, bench_name: str) -> str:
    return os.path.join(out, "runs", row.suite, f"{row.model}-{row.name}-{row.tokens}", bench_name)


def kept_jaccard(a_dir: str, b_dir: str) -> float | None:
    """Mean Jaccard index of the final kept patches of two runs over their common questions (1: the same sets)."""
    def kept(d):
        with open(os.path.join(d, "predictions.jsonl")) as f:
            return {r["question_id"]: set(r["kept_patches"]) for r in map(json.loads, f) if r.get("kept_patches")}

    a, b = kept(a_dir), kept(b_dir)
    common = [q for q in a if q in b]
    if not common:
        return None
    return sum(len(a[q] & b[q]) / len(a[q] | b[q]) for q in common) / len(common)


def _gqa_targets(data: str) -> dict[str, list[int]]:
    with open(os.path.join(data, "gqa", "testdev_balanced_questions.json")) as f:
        return {k: v.get("target_patches", []) for k, v in json.load(f).items()}


def _by_type(data: str, run_dir: str) -> dict[str, float]:
    from ivtp.eval.metrics import gqa_score

    with open(os.path.join(data, "gqa", "testdev_balanced_questions.json")) as f:
        questions = json.load(f)
    with open(os.path.join(run_dir, "predictions.jsonl")) as f:
        preds = {r["question_id"]: r["text"] for r in map(json.loads, f)}
    out = {}
    for qtype in QTYPES:
        sub = {k: v for k, v in preds.items() if questions[k]["types"]["detailed"] == qtype}
        if sub:
            out[qtype] = gqa_score(sub, questions)["accuracy"]
    return out


def key_words(question: str) -> set[str]:
    """The words of a testbed question that name the object it asks about: its colour and shape words."""
    from ivtp.data.shapes import COLOURS, SHAPES

    return {w for w in _words(question) if w in COLOURS or w in SHAPES}


def _words(text: str) -> list[str]:
    return [w.strip("?.,:!").lower() for w in text.split()]


def key_word_hits(data: str, run_dir: str) -> dict[str, float] | None:
    """Per question type, the share of questions naming their object (key_words) for which stage 2's pseudo-CLS
    holds at least one of those words (a fallback to the visual [CLS] is a miss); None without stage-2 guidance."""
    with open(os.path.join(data, "gqa", "testdev_balanced_questions.json")) as f:
        questions = json.load(f)
    hits: dict[str, list[bool]] = {}
    with open(os.path.join(run_dir, "predictions.jsonl")) as f:
        for r in map(json.loads, f):
            if "selected_tokens" not in r:
                return None
            q = questions[r["question_id"]]
            keys = key_words(q["question"])
            if keys:
                hit = bool(keys & {w for t in r["selected_tokens"] for w in _words(t)})
                for qtype in (q["types"]["detailed"], "all"):
                    hits.setdefault(qtype, []).append(hit)
    return {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}


def fresh_split(testbed: str, out: str, images: int) -> str:
    """An eval folder whose GQA-layout split is new (`images` images of the split "fresh", which no stage of the
    testbed reads), and whose POPE layout is the testbed's: for reporting settings chosen on the testbed's own
    split. Written once under `out`; returns the folder."""
    from ivtp.data.shapes import write_gqa_eval

    folder = os.path.join(out, f"fresh_{images}")
    if not os.path.isfile(os.path.join(folder, "gqa", "testdev_balanced_questions.json")):
        with open(os.path.join(testbed, "testbed.json")) as f:
            cfg = json.load(f)
        write_gqa_eval(folder, images, cfg["seed"], cfg["image_size"], split="fresh")
    pope = os.path.join(folder, "pope")
    if not os.path.exists(pope):
        os.symlink(os.path.abspath(os.path.join(testbed, "data", "eval", "pope")), pope)
    return folder


def ablate(testbed: str, out: str, suites=SUITES, budgets=DEFAULT_BUDGETS, limit: int | None = None,
           batch_size: int = 32, pope_images: int = 100, progress: bool = True, fresh: int | None = None,
           finetuned: str | None = None) -> list[Row]:
    """Run the suites on a testbed folder (`ivtp.testbed.pipeline`'s output) and write the tables and plots.
    fresh: evaluate the GQA-layout questions of a new split of that many images instead (`fresh_split`).
    finetuned: the model the suites prune in pure inference, instead of <testbed>/llava."""
    data = os.path.join(testbed, "data", "eval")
    models = {"finetuned": finetuned or os.path.join(testbed, "llava"),
              "retrained": os.path.join(testbed, "llava-ivtp")}
    for name, path in models.items():
        if name == "finetuned" and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no trained testbed model; run `make testbed` first")
    with open(os.path.join(testbed, "testbed.json")) as f:
        llm_layers = json.load(f)["llm_layers"]
    if fresh:
        data = fresh_split(testbed, out, fresh)
    retrained = os.path.isfile(os.path.join(models["retrained"], "config.json"))
    projectors = {}
    if "methods" in suites:  # the trained compressors (ivtp.testbed.projectors), where they are trained
        from ivtp.testbed.projectors import model_dir, trained_projectors

        found, missing = trained_projectors(testbed)
        for name, (path, n) in found.items():
            models[model_dir(name)], projectors[name] = path, n
        if missing:
            print(f"ablate: no trained {', '.join(missing)} in {testbed} (llava-<name>): those rows are skipped; "
                  "`make testbed-projectors` trains them", file=sys.stderr, flush=True)
    rows = plan_rows(suites, budgets, os.path.join(testbed, "clip", "aligner.safetensors"), llm_layers, retrained,
                     projectors)
    for row in tqdm(rows, desc="ablate", disable=not progress):
        row.path = models[row.model]
        row.metrics = run_row(row, row.path, data, out, limit, batch_size, pope_images)
    by_name = {(r.suite, r.name): r for r in rows}
    for row in rows:
        other = by_name.get((row.suite, row.compare))
        if other is not None:
            row.metrics["jaccard_to_compare"] = kept_jaccard(row_dir(out, row, "gqa"), row_dir(out, other, "gqa"))
    write_reports(rows, out)
    return rows


# ------------------------------------------------------------------------------------------------------ reports
def headline(row: Row) -> tuple[float, float | None]:
    """(GQA-layout accuracy, POPE-layout mean F1) of a row."""
    pope = row.metrics.get("pope")
    return row.metrics["gqa"]["accuracy"], None if pope is None else pope["overall"].get("f1_category_mean",
                                                                                        pope["overall"]["f1"])


def line_colours(n: int) -> list[tuple]:
    """n distinct RGBA colours for the lines of one plot: the default cycle repeats after 10, and the methods
    plot has more lines (random and tome+ shared one). tab10, then Dark2: 18 hues that stay apart."""
    from matplotlib import colormaps

    palette = [colormaps["tab10"](i) for i in range(10)] + [colormaps["Dark2"](i) for i in range(8)]
    if n > len(palette):
        raise ValueError(f"{n} lines: more than the {len(palette)} distinct colours of the palette")
    return palette[:n]


def write_reports(rows: list[Row], out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "ablate.json"), "md": os.path.join(out, "ablate.md")}
    with open(paths["json"], "w") as f:
        json.dump([r.__dict__ for r in rows], f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(rows))
    paths.update(plot(rows, out))
    return paths


SELECTION_TYPES = ("colour", "shape", "position")  # the questions about one object: where selection can be judged


def on_target(row: Row, key: str = "kept_on_target_share", qtype: str = "all") -> float | None:
    """A row's share of kept patches on the question's target patches (percent), or None."""
    sel = row.metrics.get("selection") or {}
    value = (sel.get(key) or {}).get(qtype)
    return None if value is None else 100 * value


def selection_cells(r: Row) -> list[str]:
    """The mean accuracy of colour, shape and position questions (what selection should move); the final share on
    them together and per type, the share after stage 1, the aligner's fallback rate and the key-word hit rate (all
    percent; blank where they do not apply)."""
    def fmt(v):
        return "" if v is None else f"{v:.1f}"

    sel = r.metrics.get("selection") or {}
    accuracy = [r.metrics.get("gqa_by_type", {}).get(q) for q in SELECTION_TYPES]
    final = [on_target(r, qtype=q) for q in SELECTION_TYPES]
    stage1 = [on_target(r, "stage1_on_target_share", q) for q in SELECTION_TYPES]
    fallback = sel.get("aligner_fallback_rate")
    hits = r.metrics.get("key_word_hit") or {}
    jaccard = r.metrics.get("jaccard_to_compare")
    return [fmt(_mean(accuracy)), fmt(_mean(final)), *map(fmt, final), fmt(_mean(stage1)),
            fmt(None if fallback is None else 100 * fallback), fmt(hits.get("all")),
            "" if jaccard is None else f"{jaccard:.2f} ({r.compare})"]


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def markdown(rows: list[Row]) -> str:
    unpruned = next((r for r in rows if r.name == "unpruned"), None)
    ref = headline(unpruned)[0] if unpruned else None
    lines = ["Acc c+s+p: the mean accuracy of the colour, shape and position questions. On target: the share of the final kept patches that lie on the question's object (colour, shape and "
             "position questions, mean of the three types, then each); stage 1: the same for the tokens that reached "
             "the LLM; fallback: rows whose pseudo-CLS fell back to the visual [CLS]; key word: questions whose "
             "pseudo-CLS holds a colour or shape word of the question (all percent); Jaccard: the mean Jaccard index "
             "of the final kept patches with those of the row named (its random-query control: 1.00 means the "
             "instruction changed nothing).", ""]
    paths = dict.fromkeys(f"{r.model} = {r.path}" for r in rows if r.path)
    if paths:
        lines += ["Models: " + "; ".join(paths) + ".", ""]
    sel_head = ["acc c+s+p", "on target c+s+p", "colour", "shape", "position", "stage 1", "fallback", "key word", "Jaccard"]
    for suite in dict.fromkeys(r.suite for r in rows):
        lines += [f"## {suite}", "", "| model | row | tokens | GQA-layout acc | retained | " + " | ".join(QTYPES)
                  + " | POPE F1 | " + " | ".join(sel_head) + " |", "|" + " --- |" * (6 + len(QTYPES) + len(sel_head))]
        for r in (r for r in rows if r.suite == suite):
            acc, f1 = headline(r)
            kept = "" if ref in (None, 0) else f"{100 * acc / ref:.0f}%"
            by_type = " | ".join(f"{r.metrics['gqa_by_type'].get(q, float('nan')):.1f}" for q in QTYPES)
            tokens = "64" if r.tokens is None else str(r.tokens)
            lines.append(f"| {r.model} | {r.name} | {tokens} | {acc:.1f} | {kept} | {by_type} | "
                         f"{'' if f1 is None else f'{f1:.1f}'} | " + " | ".join(selection_cells(r)) + " |")
        lines.append("")
    return "\n".join(lines)


def is_projector(model: str) -> bool:
    """Whether a row's model is a trained compressor's (its own folder, llava-<name>; ivtp.testbed.projectors)."""
    from ivtp.testbed.projectors import PROJECTORS, model_dir

    return model in {model_dir(name) for name in PROJECTORS}


def plot(rows: list[Row], out: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    method_rows = [r for r in rows if r.suite == "methods" and r.tokens]
    if method_rows:
        fig, ax = plt.subplots(figsize=(8, 5))
        keys = list(dict.fromkeys((r.model, r.name) for r in method_rows))
        for key, colour in zip(keys, line_colours(len(keys))):
            pts = sorted((r.tokens, headline(r)[0]) for r in method_rows if (r.model, r.name) == key)
            if is_projector(key[0]):  # a trained compressor: one point, at its own token count
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "s", color=colour, ms=7,
                        label=f"{key[1]} (trained, {pts[0][0]} tokens)")
                continue
            style = "--" if key[1] == "oracle" else ("-o" if key[1] == "ivtp" else "-.")
            label = f"{key[1]} ({key[0]})" if key[0] == "retrained" else key[1]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color="k" if key[1] == "oracle" else colour,
                    label=label, lw=2 if key[1] == "ivtp" else 1)
        for r in rows:
            if r.suite == "methods" and r.name in ("unpruned", "no_image"):
                ax.axhline(headline(r)[0], color="gray", ls=":", lw=1)
                ax.text(ax.get_xlim()[0], headline(r)[0], f" {r.name}", va="bottom", fontsize=8, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens per image (of 64)")
        ax.set_ylabel("GQA-layout accuracy (%)")
        ax.set_title("Testbed: accuracy against budget")
        ax.legend(fontsize=7, ncol=2)
        paths["methods_png"] = os.path.join(out, "ablate_methods.png")
        fig.tight_layout()
        fig.savefig(paths["methods_png"], dpi=120)
        plt.close(fig)
    others = [s for s in dict.fromkeys(r.suite for r in rows) if s != "methods"]
    if others:
        # Top: accuracy. Bottom: where the kept tokens lie (final and after stage 1, colour/shape/position).
        fig, axes = plt.subplots(2, len(others), figsize=(4 * len(others), 7.5), squeeze=False)
        for col, suite in enumerate(others):
            sub = [r for r in rows if r.suite == suite]
            names = [r.name.split("=")[-1] for r in sub]
            ax = axes[0][col]
            ax.bar(range(len(sub)), [headline(r)[0] for r in sub], color="tab:blue")
            ax.set_xticks(range(len(sub)), names, rotation=45, ha="right", fontsize=8)
            ax.set_title(suite)
            ax.set_ylabel("GQA-layout accuracy (%)")
            ax = axes[1][col]
            x = torch.arange(len(sub)).float()
            for offset, key, label, colour in ((-0.2, "kept_on_target_share", "final", "tab:green"),
                                               (0.2, "stage1_on_target_share", "after stage 1", "tab:gray")):
                values = [_mean([on_target(r, key, q) for q in SELECTION_TYPES]) or 0.0 for r in sub]
                ax.bar((x + offset).tolist(), values, width=0.4, color=colour, label=label)
            ax.set_xticks(range(len(sub)), names, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel("kept patches on target (%)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths["ablations_png"] = os.path.join(out, "ablate_ablations.png")
        fig.savefig(paths["ablations_png"], dpi=120)
        plt.close(fig)
    return paths
