"""`ivtp flops` and `ivtp bench` plumbing (the FLOPs convention itself is tested in test_flops.py). No speed is
asserted here: speed is measured with `ivtp bench` and recorded in docs/benchmarks.md."""

import json
import math
import subprocess
import sys

import pytest

from ivtp.cli import main
from ivtp.eval.bench import bench


def flops(capsys, *argv):
    assert main(["flops", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_flops_unpruned_llava15_7b_matches_the_paper_total(capsys):
    out = flops(capsys, "--model", "llava-1.5-7b", "--method", "none", "--text-tokens", "512")
    assert out["total"] == pytest.approx(15.364, abs=0.0005)
    assert out["total"] == pytest.approx(out["vit"] + out["llm"] + out["extra"])
    assert out["llm_tokens"] == [576 + 512] * 32 and len(out["vit_tokens"]) == 23


@pytest.mark.parametrize("method", ["ivtp", "topk", "fastv", "visiondrop", "tome", "topk+"])
def test_flops_follow_each_methods_schedule(capsys, method):
    out = flops(capsys, "--model", "llava-1.5-7b", "--method", method, "--visual-tokens", "64")
    per_layer = out["llm_visual_per_layer"]
    assert len(per_layer) == 32 and out["llm_tokens"] == [v + 512 for v in per_layer]
    assert out["llm_equivalent_visual_tokens"] == pytest.approx(sum(per_layer) / 32)
    assert out["final_visual_tokens"] == (19 if method == "visiondrop" else 64)
    if method == "fastv":  # K=2: 576 through layers 0-1, 64 from layer 2 on
        assert per_layer[:3] == [576, 576, 64]
    if method == "ivtp":  # GTP in the ViT: fewer tokens in later layers
        assert out["vit_tokens"][0] == 577 and out["vit_tokens"][-1] < 577
    assert (out["extra"] > 0) == (method in ("ivtp", "topk+"))  # the aligner and the in-LLM rollouts


def test_flops_13b_and_bad_budget(capsys):
    out = flops(capsys, "--model", "llava-1.5-13b", "--method", "none")
    assert len(out["llm_tokens"]) == 40
    assert main(["flops", "--model", "llava-1.5-7b", "--method", "topk", "--visual-tokens", "600"]) == 2
    assert "topk.keep" in capsys.readouterr().err


def test_flops_on_llava_next_prices_the_image_size_given(capsys):
    out = flops(capsys, "--model", "llava-1.6-7b", "--method", "topk", "--image-size", "400x1000")
    assert out["image_size"] == [400, 1000] and out["crops"] == 4 and out["final_visual_tokens"] == 4 * 64
    square = flops(capsys, "--model", "llava-1.6-7b", "--method", "none")  # the default image: 672 x 672
    assert square["image_size"] == [672, 672] and square["crops"] == 5 and square["final_visual_tokens"] == 2928
    assert len(square["vit_tokens"]) == 23 and square["vit"] == pytest.approx(5 * flops(
        capsys, "--model", "llava-1.5-7b", "--method", "none")["vit"])


def test_flops_of_vispruner_on_llava_next_price_its_layouts_expected_count(capsys):
    # Its own layout: the base view's 64, the tiles' 4 x 64 (nothing cut from a square), 48 rows' newlines.
    out = flops(capsys, "--model", "llava-1.6-7b", "--method", "vispruner", "--visual-tokens", "64")
    assert out["final_visual_tokens"] == 64 + 4 * 64 + 48
    # A 400 x 1000 image: 1 x 3 tiles cut to 24 x 60 of their 24 x 72: 64 + round(64 x 1440 / 576) + 24 = 248.
    wide = flops(capsys, "--model", "llava-1.6-7b", "--method", "vispruner", "--image-size", "400x1000")
    assert wide["final_visual_tokens"] == 64 + 160 + 24


def test_flops_of_an_in_llm_method_on_llava_next_keep_the_budgets_share_of_the_stock_tokens(capsys):
    out = flops(capsys, "--model", "llava-1.6-7b", "--method", "fastv", "--visual-tokens", "64")
    # FastV K = 2: the stock 2,928 tokens through layers 0-1, then 64 per 576 of them: round(64 x 2928 / 576) = 325
    assert out["llm_visual_per_layer"][:3] == [2928, 2928, 325] and out["final_visual_tokens"] == 325


def _per_image_config(tmp_path, name, body):
    path = tmp_path / f"{name}.yaml"
    path.write_text(body + "anyres:\n  budget: per_image\n")
    return str(path)


def test_flops_of_budgets_per_image_price_each_crop_at_its_share(capsys, tmp_path):
    """topk at 320 per image: on a 5-crop image the same as 64 per crop; on a 4-crop one the same as 80 per crop;
    at 321 the base view keeps 65 and the tiles 64, priced crop by crop (llava_flops' crop_vit_tokens)."""
    from ivtp.eval.flops import Arch, llava_flops
    from ivtp.models import preset_config

    def topk(keep, *extra):
        return flops(capsys, "--model", "llava-1.6-7b", "--prune-config",
                     _per_image_config(tmp_path, f"topk{keep}", f"method: topk\ntopk:\n  keep: {keep}\n"), *extra)

    per_crop = flops(capsys, "--model", "llava-1.6-7b", "--method", "topk", "--visual-tokens", "64")
    assert topk(320)["total"] == pytest.approx(per_crop["total"]) and topk(320)["final_visual_tokens"] == 320
    wide = topk(320, "--image-size", "400x1000")
    wide_per_crop = flops(capsys, "--model", "llava-1.6-7b", "--method", "topk", "--visual-tokens", "80",
                          "--image-size", "400x1000")
    assert wide["crops"] == 4 and wide["total"] == pytest.approx(wide_per_crop["total"])
    odd = topk(321)
    arch = Arch.from_llava_config(preset_config("llava-1.6-7b", vocab_size=32064))
    by_hand = llava_flops(arch, 512, llm_visual_per_layer=[321] * 32, crops=5,
                          crop_vit_tokens=[[577] * 23] * 5)  # topk scores at the feature layer: the ViT is unpruned
    assert odd["final_visual_tokens"] == 321 and odd["total"] == pytest.approx(by_hand["total"])


def test_flops_of_an_in_llm_method_per_image_keep_its_count_of_the_images_stock_tokens(capsys, tmp_path):
    config = _per_image_config(tmp_path, "fastv", "method: fastv\nfastv:\n  keep: 320\n")
    for size, stock in [("672x672", 2928), ("400x1000", 576 + 24 * 61)]:
        out = flops(capsys, "--model", "llava-1.6-7b", "--prune-config", config, "--image-size", size)
        assert out["llm_visual_per_layer"][:3] == [stock, stock, 320] and out["final_visual_tokens"] == 320


def test_flops_of_ivtp_per_image_price_each_crops_own_schedule(capsys):
    """IVTP's stage 1 at 640 per image: 128 per crop of a 672 x 672 image (5 crops), 214/213/213 of a 3-crop
    336 x 672 one, whose ViT layers hold each crop's own linear schedule."""
    from ivtp import PruneConfig
    from ivtp.eval.bench import method_flops
    from ivtp.eval.flops import Arch, llava_flops
    from ivtp.models import preset_config
    from ivtp.patch.llava import make_plans

    config = preset_config("llava-1.6-7b", vocab_size=32064)
    prune = PruneConfig.load("configs/next/ivtp_per_image_320.yaml")
    out = method_flops(config, prune, 512, image_size=(336, 672))
    runner, _ = make_plans(prune, config)
    assert out["crops"] == 3 and out["final_visual_tokens"] == 320
    crops = [runner.at(k).vit_tokens_per_layer() for k in (214, 213, 213)]
    assert crops[0][0] == crops[1][0] == 577 and crops[0] != crops[1]  # each crop's own schedule
    by_hand = llava_flops(Arch.from_llava_config(config), 512, llm_visual_per_layer=out["llm_visual_per_layer"],
                          crops=3, crop_vit_tokens=crops)
    assert out["vit"] == pytest.approx(by_hand["vit"])


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "llava-1.5-7b", "--image-size", "672x672"], "--image-size prices LLaVA-NeXT's AnyRes crops"),
    (["--model", "llava-1.6-7b", "--projector", "honeybee", "--method", "none"], "compressors are LLaVA-1.5's"),
])
def test_flops_refuses_what_llava_next_does_not_price(capsys, argv, fragment):
    assert main(["flops", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_bench_on_a_llava_next_preset_prices_its_crops(capsys):
    assert main(["bench", "--preset", "tiny-random-next", "--method", "topk", "--visual-tokens", "32",
                 "--repeats", "1", "--new-tokens", "2", "--allocator", "default", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_size"] == [672, 672]
    assert out["flops_speedup"] > 1 and out["pruned"]["kv_cache_bytes"] < out["unpruned"]["kv_cache_bytes"]
    # The unpruned prompt holds the stock 2,928 image tokens, the pruned one 32 per crop of the 5.
    assert out["unpruned"]["prompt_tokens"] == out["text_tokens"] + 2928


def test_bench_reports_pruned_against_unpruned(capsys):
    # The default allocator keeps this test process's malloc as it is (the steady one is tested in a child).
    assert main(["bench", "--preset", "tiny-random", "--method", "ivtp", "--visual-tokens", "64", "--repeats", "1",
                 "--new-tokens", "2", "--allocator", "default", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["allocator"] == "default" and out["threads"] >= 1
    lo, hi = out["speedup_prefill_paired_quartiles"]  # one repeat: one back-to-back ratio
    assert lo == hi == pytest.approx(out["unpruned"]["prefill_s"] / out["pruned"]["prefill_s"])
    assert all(out[run]["prefill_page_faults"] >= 0 for run in ("unpruned", "pruned"))
    for key in ("speedup_prefill", "flops_speedup", "speedup_decode", "kv_cache_ratio", "prefill_vs_flops"):
        assert out[key] > 0
    assert out["pruned"]["kv_cache_bytes"] < out["unpruned"]["kv_cache_bytes"]  # fewer tokens cached
    assert out["flops_pruned_tflops"] < out["flops_unpruned_tflops"]
    assert 0 <= out["scoring_overhead"]["scoring_share"] <= 1
    for run in ("unpruned", "pruned"):  # the split adds up to the prefill and both parts took time
        r = out[run]
        assert 0 < r["prefill_llm_s"] < r["prefill_s"] and r["prefill_before_llm_s"] > 0
        assert r["prefill_llm_s"] + r["prefill_before_llm_s"] == pytest.approx(r["prefill_s"])  # one repeat
    llm = out["stages"]["llm"]
    assert llm["speedup"] == pytest.approx(llm["unpruned_s"] / llm["pruned_s"])
    assert out["stages"]["before_llm"]["flops_speedup_vit"] > 1  # GTP prunes inside the ViT


# A child process: re-allocates and touches a 64 MiB tensor, and prints the minor page faults of the last 4 rounds.
_FAULTS = """
import sys, torch
from ivtp.eval.bench import _minor_faults, steady_allocator
took = steady_allocator() if sys.argv[1] == "steady" else None
for i in range(8):  # glibc may alternate between two blocks: the first rounds warm both
    if i == 4:
        start = _minor_faults()
    x = torch.empty(16 * 2**20); x.fill_(1.0); del x
print(took, _minor_faults() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_steady_allocator_stops_the_page_faults_of_reallocating():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        took, faults = out.stdout.split()
        return took, int(faults)

    took, steady = run("steady")
    _, default = run("default")
    assert took == "True"
    if default < 16000:  # with transparent huge pages always on, a fresh block costs few faults anyway
        pytest.skip(f"glibc's own allocator took only {default} faults here: nothing to stop")
    # glibc maps a 64 MiB block afresh each time, a fault per 4 KiB page touched (4 rounds: 65536 pages); the
    # steady allocator reuses the freed blocks, whose pages are already there
    assert steady < 1000


def test_paired_quartiles_against_hand_values():
    from ivtp.eval.bench import _quartiles

    # inclusive method: positions 1 + (n - 1) * q among the sorted values, interpolated
    assert _quartiles([4.0, 1.0, 3.0, 2.0, 5.0]) == [2.0, 4.0]
    assert _quartiles([1.0, 2.0, 3.0, 4.0]) == [1.75, 3.25]
    assert _quartiles([2.5]) == [2.5, 2.5]


@pytest.mark.parametrize("method, scored", [("ivtp", True), ("topk", False)])
def test_bench_writes_a_chrome_trace_of_a_pruned_prefill(capsys, tmp_path, method, scored):
    path = tmp_path / "prefill.json"
    assert main(["bench", "--preset", "tiny-random", "--method", method, "--repeats", "1", "--new-tokens", "1",
                 "--allocator", "default", "--trace", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"] == str(path) and (out["scoring_overhead"] is not None) == scored
    names = {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}
    assert "ivtp.score" in names  # each method labels its selection
    assert ("ivtp.guidance" in names) == scored  # only IVTP's pseudo-CLS has text guidance


def test_bench_rejects_an_unknown_allocator():
    with pytest.raises(ValueError, match="allocator"):
        bench("tiny-random", "ivtp", 64, allocator="jemalloc")


@pytest.mark.parametrize("method, guidance_ranges", [("ivtp", 3), ("sparsevlm", 2)])
def test_scoring_ranges_cover_the_guidance_and_never_nest(method, guidance_ranges):
    """`scoring_share` adds up the labelled ranges, so the text guidance (the instruction mask; IVTP's CLIP
    aligner: its text half before the tower and its image half after; SparseVLM's raters) must sit in them, and no
    range inside another."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ivtp.config import PruneConfig
    from ivtp.eval.bench import SCORING_RANGES, subjects

    _, model, inputs = subjects("tiny-random", PruneConfig.for_method(method, 64))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs)
    ranges = [e for e in prof.events() if e.name in SCORING_RANGES]
    assert sum(e.name == "ivtp.guidance" for e in ranges) == guidance_ranges

    def inside(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in SCORING_RANGES:
                return True
            parent = parent.cpu_parent
        return False

    assert not any(inside(e) for e in ranges)


def test_subjects_without_a_preset_aligner_build_the_configs_architecture_with_random_weights(monkeypatch):
    """The llava-1.5 presets bring no aligner: the bench then builds the config's aligner model with random weights
    (same cost, no download), and honours the attention implementation it is asked for."""
    from ivtp import models
    from ivtp.config import PruneConfig
    from ivtp.eval.bench import subjects

    monkeypatch.setattr(models, "preset_aligner", lambda name: None)
    config = PruneConfig.for_method("ivtp", 64)
    config.llm.aligner.model, config.llm.aligner.pretrained = "ivtp-tiny-clip", "openai"  # no such weights exist
    stock, pruned, _ = subjects("tiny-random", config, attn_implementation="eager")
    assert pruned.ivtp_state.aligner.name == "ivtp-tiny-clip (pretrained=None)"
    assert stock.config.text_config._attn_implementation == "eager"
    assert pruned.config.vision_config._attn_implementation == "eager"


def test_a_batch_caches_each_row_and_counts_every_rows_tokens():
    one = bench("tiny-random", "topk", 16, repeats=1, new_tokens=2, progress=False, allocator="default")
    three = bench("tiny-random", "topk", 16, repeats=1, new_tokens=2, progress=False, allocator="default",
                  batch_size=3)
    assert (one["batch_size"], three["batch_size"]) == (1, 3)
    for run in ("unpruned", "pruned"):  # three equal-length rows: three times the cache of one
        assert three[run]["kv_cache_bytes"] == 3 * one[run]["kv_cache_bytes"]
    assert three["text_tokens"] == one["text_tokens"] and three["flops_speedup"] == one["flops_speedup"]
    with pytest.raises(ValueError, match="batch_size"):
        bench("tiny-random", "topk", 16, batch_size=0)


def test_bench_compile_reports_the_compiled_prefills_and_their_compile(capsys):
    """--compile: the stock prefill is compiled too ("unpruned_compiled"); the ratios against both, and each
    compile's cost apart from the steady state. Dynamo's eager backend here (tracing only: the figures of a
    kernel compiler are in docs/benchmarks.md). Nothing can be clocked inside one graph: no stage split."""
    assert main(["bench", "--preset", "tiny-random", "--method", "topk", "--visual-tokens", "64", "--repeats", "1",
                 "--new-tokens", "1", "--allocator", "default", "--compile", "eager", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    compiled, stock = out["compile"], out["compile"]["unpruned_compiled"]
    assert (compiled["backend"], compiled["mode"], compiled["bucket"]) == ("eager", None, 32)
    ours = out["pruned"]
    assert compiled["speedup_prefill_vs_stock_compiled"] == pytest.approx(stock["prefill_s"] / ours["prefill_s"])
    assert compiled["speedup_prefill_vs_stock_eager"] == pytest.approx(out["speedup_prefill"])
    assert compiled["compile_s"]["pruned"] == pytest.approx(ours["first_prefill_s"] - ours["prefill_s"])
    assert compiled["compile_s"]["pruned"] > 0 and compiled["compile_s"]["unpruned"] > 0  # tracing took time
    assert math.isnan(out["pruned"]["prefill_llm_s"]) and out["unpruned"]["prefill_llm_s"] > 0
    assert out["scoring_overhead"] is None and stock["kv_cache_bytes"] == out["unpruned"]["kv_cache_bytes"]
    eager = compiled["pruned_eager"]  # the same pruned model run eagerly in the same run
    assert compiled["compiled_vs_eager_pruned"] == pytest.approx(eager["prefill_s"] / ours["prefill_s"])
    assert eager["kv_cache_bytes"] == ours["kv_cache_bytes"] and eager["prefill_llm_s"] > 0
