"""`ivtp ablate`: accuracy of every method and IVTP ablation on the testbed's held-out splits (docs/testbed.md).

Each row is one prune config evaluated with `ivtp eval`'s runner on the GQA-layout and POPE-layout splits that
`ivtp.data.shapes.generate_testbed` writes; predictions are kept under <out>/runs, so an interrupted or extended
sweep only runs what is missing. Two baselines frame the methods: no image (a floor: what the question alone
gives) and an oracle that keeps the patches of the object the question is about (a ceiling the generator knows).

Suites:
- methods:     every method at each budget, on the unpruned-trained model; IVTP also on the IVTP-retrained one
- group:       stage-1 group size 1, 2, 3, 4, 6 (IVTP Table 8)
- tau:         the relevance threshold of the pseudo-CLS
- aggregation: how a group's attention rows are combined, in both stages (Tables 4-5)
- guidance:    where stage 2's query comes from (Table 6)
- stages:      vision-only, LLM-only and two-stage at the same final budget (Table 7)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ivtp.data.jsonio import dump_jsonl
from ivtp.methods.peers import PeerRunner
from ivtp.testbed.configs import TESTBED_METHODS, fit_prune_config

SUITES = ("methods", "group", "tau", "aggregation", "guidance", "stages")
QTYPES = ("colour", "shape", "position", "count", "existence")
DEFAULT_BUDGETS = (4, 7, 14)
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


def plan_rows(suites, budgets, aligner: str, llm_layers: int, retrained: bool) -> list[Row]:
    """Every row of the chosen suites (the prune configs they evaluate)."""
    def cfg(method, k, **over):
        return fit_prune_config(method, k, llm_layers, aligner=aligner, **over).to_dict()

    rows: list[Row] = []
    if "methods" in suites:
        rows += [Row("methods", "unpruned", "finetuned", None), Row("methods", "no_image", "finetuned", 0,
                                                                     baseline="no_image")]
        for k in budgets:
            rows.append(Row("methods", "oracle", "finetuned", k, cfg("topk", k), baseline="oracle"))
            rows += [Row("methods", m, "finetuned", k, cfg(m, k)) for m in TESTBED_METHODS]
            if retrained:
                rows.append(Row("methods", "ivtp", "retrained", k, cfg("ivtp", k)))
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
        rows += [Row("guidance", f"guidance={g}", "finetuned", MAIN_TOKENS, cfg("ivtp", MAIN_TOKENS, llm={"guidance": g}))
                 for g in ("clip", "llm_threshold", "all_text", "none")]
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
        run_dir = os.path.join(out, "runs", row.suite, f"{row.model}-{row.name}-{row.tokens}", bench_name)
        run = {"benchmark": bench_name, "model": model_dir, "prune_config": row.config, "max_new_tokens": 4,
               "image_aspect_ratio": "pad", "baseline": row.baseline}
        root = os.path.join(data, "gqa") if bench_name == "gqa" else pope_subset(data, out, pope_images)
        summary = evaluate(model, processor, bench, root, run_dir, run, limit=limit if bench_name == "gqa" else None,
                           batch_size=batch_size, progress=False, **options)
        result = summary["result"]
        metrics[bench_name] = result["metrics"]
        if bench_name == "gqa":
            metrics["gqa_by_type"] = _by_type(data, run_dir)
        metrics["mean_final_visual_tokens"] = result["mean_final_visual_tokens"]
    return metrics


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


def ablate(testbed: str, out: str, suites=SUITES, budgets=DEFAULT_BUDGETS, limit: int | None = None,
           batch_size: int = 32, pope_images: int = 100, progress: bool = True) -> list[Row]:
    """Run the suites on a testbed folder (`ivtp.testbed.pipeline`'s output) and write the tables and plots."""
    data = os.path.join(testbed, "data", "eval")
    models = {"finetuned": os.path.join(testbed, "llava"), "retrained": os.path.join(testbed, "llava-ivtp")}
    for name, path in models.items():
        if name == "finetuned" and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no trained testbed model; run `make testbed` first")
    with open(os.path.join(testbed, "testbed.json")) as f:
        llm_layers = json.load(f)["llm_layers"]
    retrained = os.path.isfile(os.path.join(models["retrained"], "config.json"))
    rows = plan_rows(suites, budgets, os.path.join(testbed, "clip", "aligner.safetensors"), llm_layers, retrained)
    for row in tqdm(rows, desc="ablate", disable=not progress):
        row.metrics = run_row(row, models[row.model], data, out, limit, batch_size, pope_images)
    write_reports(rows, out)
    return rows


# ------------------------------------------------------------------------------------------------------ reports
def headline(row: Row) -> tuple[float, float | None]:
    """(GQA-layout accuracy, POPE-layout mean F1) of a row."""
    pope = row.metrics.get("pope")
    return row.metrics["gqa"]["accuracy"], None if pope is None else pope["overall"].get("f1_category_mean",
                                                                                        pope["overall"]["f1"])


def write_reports(rows: list[Row], out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "ablate.json"), "md": os.path.join(out, "ablate.md")}
    with open(paths["json"], "w") as f:
        json.dump([r.__dict__ for r in rows], f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(rows))
    paths.update(plot(rows, out))
    return paths


def markdown(rows: list[Row]) -> str:
    unpruned = next((r for r in rows if r.name == "unpruned"), None)
    ref = headline(unpruned)[0] if unpruned else None
    lines = []
    for suite in dict.fromkeys(r.suite for r in rows):
        lines += [f"## {suite}", "", "| model | row | tokens | GQA-layout acc | retained | " + " | ".join(QTYPES)
                  + " | POPE F1 |", "|" + " --- |" * (6 + len(QTYPES))]
        for r in (r for r in rows if r.suite == suite):
            acc, f1 = headline(r)
            kept = "" if ref in (None, 0) else f"{100 * acc / ref:.0f}%"
            by_type = " | ".join(f"{r.metrics['gqa_by_type'].get(q, float('nan')):.1f}" for q in QTYPES)
            tokens = "64" if r.tokens is None else str(r.tokens)
            lines.append(f"| {r.model} | {r.name} | {tokens} | {acc:.1f} | {kept} | {by_type} | "
                         f"{'' if f1 is None else f'{f1:.1f}'} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[Row], out: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    method_rows = [r for r in rows if r.suite == "methods" and r.tokens]
    if method_rows:
        fig, ax = plt.subplots(figsize=(8, 5))
        for key in dict.fromkeys((r.model, r.name) for r in method_rows):
            pts = sorted((r.tokens, headline(r)[0]) for r in method_rows if (r.model, r.name) == key)
            style = "k--" if key[1] == "oracle" else ("-o" if key[1] == "ivtp" else "-.")
            label = f"{key[1]} ({key[0]})" if key[0] == "retrained" else key[1]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, lw=2 if key[1] == "ivtp" else 1)
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
        fig, axes = plt.subplots(1, len(others), figsize=(4 * len(others), 4), squeeze=False)
        for ax, suite in zip(axes[0], others):
            sub = [r for r in rows if r.suite == suite]
            ax.bar(range(len(sub)), [headline(r)[0] for r in sub], color="tab:blue")
            ax.set_xticks(range(len(sub)), [r.name.split("=")[-1] for r in sub], rotation=45, ha="right",
                          fontsize=8)
            ax.set_title(suite)
            ax.set_ylabel("GQA-layout accuracy (%)")
        fig.tight_layout()
        paths["ablations_png"] = os.path.join(out, "ablate_ablations.png")
        fig.savefig(paths["ablations_png"], dpi=120)
        plt.close(fig)
    return paths
