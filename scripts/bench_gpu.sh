#!/usr/bin/env bash
# The GPU checks and the llava-1.5 latency figures of docs/benchmarks.md, on one CUDA GPU. Random weights:
# nothing is downloaded. Usage: scripts/bench_gpu.sh [OUT_DIR]  (REPEATS, PYTHON and RUNS override the defaults)
set -u
out=${1:-ivtp_out/bench-gpu}
py=${PYTHON:-python}
mkdir -p "$out"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" | tee "$out/env.txt"
"$py" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$out/tests_gpu.log"
"$py" scripts/bench_fused_maps.py 2>&1 | tee "$out/fused_maps.txt"

# "preset method visual-tokens batch-size [compile mode]", one run per line; each writes
# OUT_DIR/<preset>_<method>_<tokens>_b<batch>[_<mode>].json. One prompt leaves the 7B model bound by kernel launches
# (see docs/benchmarks.md), a batch of 16 by its FLOPs. A compile mode runs `--compile --compile-mode MODE`: the
# pruned prefill as one graph (reduce-overhead: CUDA graphs), against the stock prefill eager and compiled alike.
RUNS=${RUNS:-"llava-1.5-7b ivtp 64 1
llava-1.5-7b topk 64 1
llava-1.5-7b ivtp 64 16
llava-1.5-7b topk 64 16
llava-1.5-7b vispruner 64 16
llava-1.5-7b ivtp 192 16
llava-1.5-7b ivtp 64 1 reduce-overhead
llava-1.5-7b ivtp 64 16 reduce-overhead
llava-1.5-7b topk 64 16 reduce-overhead
llava-1.5-7b vispruner 64 16 reduce-overhead"}
while read -r preset method tokens batch mode; do
  flags=() suffix=""
  if [ -n "$mode" ]; then flags=(--compile --compile-mode "$mode"); suffix="_$mode"; fi
  "$py" -m ivtp.cli bench --preset "$preset" --method "$method" --visual-tokens "$tokens" --batch-size "$batch" \
    --dtype bfloat16 --repeats "${REPEATS:-21}" "${flags[@]}" --json \
    > "$out/${preset}_${method}_${tokens}_b${batch}${suffix}.json" || echo "FAILED: $preset $method $tokens batch $batch $mode"
done <<< "$RUNS"

"$py" - "$out" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    try:
        r = json.load(open(path))
    except ValueError:
        print(os.path.basename(path), "no result")
        continue
    share = (r["scoring_overhead"] or {}).get("scoring_share")
    print(f"{r['preset']} {r['method']}@{r['visual_tokens']} batch {r['batch_size']}: prefill x{r['speedup_prefill']:.2f} of FLOPs "
          f"x{r['flops_speedup']:.2f} ({100 * r['prefill_vs_flops']:.0f}%), paired x{r['speedup_prefill_paired']:.2f}, "
          f"decode x{r['speedup_decode']:.2f}, prefill {1000 * r['unpruned']['prefill_s']:.1f} -> "
          f"{1000 * r['pruned']['prefill_s']:.1f} ms (LLM {1000 * r['stages']['llm']['unpruned_s']:.1f} -> "
          f"{1000 * r['stages']['llm']['pruned_s']:.1f})"
          + (f", scoring {100 * share:.1f}%" if share is not None else ""))
    c = r.get("compile")
    if c:
        print(f"  compiled ({c['mode']}): x{c['speedup_prefill_vs_stock_eager']:.2f} vs stock eager, "
              f"x{c['speedup_prefill_vs_stock_compiled']:.2f} vs stock compiled "
              f"({100 * c['prefill_vs_flops_compiled']:.0f}% of FLOPs), compile {c['compile_s']['pruned']:.0f} s")
PY
