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

# preset method visual-tokens, one run per line; each writes OUT_DIR/<preset>_<method>_<tokens>.json
RUNS=${RUNS:-"llava-1.5-7b ivtp 64
llava-1.5-7b topk 64
llava-1.5-7b vispruner 64
llava-1.5-7b ivtp 128
llava-1.5-7b ivtp 192
llava-1.5-13b ivtp 64"}
while read -r preset method tokens; do
  "$py" -m ivtp.cli bench --preset "$preset" --method "$method" --visual-tokens "$tokens" --dtype bfloat16 \
    --repeats "${REPEATS:-21}" --json > "$out/${preset}_${method}_${tokens}.json" || echo "FAILED: $preset $method $tokens"
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
    print(f"{r['preset']} {r['method']}@{r['visual_tokens']}: prefill x{r['speedup_prefill']:.2f} of FLOPs "
          f"x{r['flops_speedup']:.2f} ({100 * r['prefill_vs_flops']:.0f}%), paired x{r['speedup_prefill_paired']:.2f}, "
          f"decode x{r['speedup_decode']:.2f}, unpruned prefill {1000 * r['unpruned']['prefill_s']:.1f} ms"
          + (f", scoring {100 * share:.1f}%" if share is not None else ""))
PY
