#!/usr/bin/env bash
# One benchmark of IVTP's Table 1 with `ivtp eval`, sharded over the GPUs in CUDA_VISIBLE_DEVICES (torchrun, one
# chunk per GPU; the last chunk to finish merges and scores). Resumes where an earlier run stopped.
# Usage: bash scripts/v1_5/eval/run.sh BENCHMARK TOKENS [extra ivtp eval args...]
#   TOKENS: visual tokens per image (64, 128, 192: configs/methods/${METHOD}_${TOKENS}.yaml; 576: unpruned).
# Environment: MODEL (llava-hf/llava-1.5-7b-hf), METHOD (ivtp), EVAL_DIR (playground/data/eval, LLaVA's layout),
#              OUT (ivtp_out/eval), DTYPE (float16).
set -euo pipefail
BENCH=${1:?benchmark}; TOKENS=${2:?visual tokens (64, 128, 192 or 576)}; shift 2
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}; METHOD=${METHOD:-ivtp}
EVAL_DIR=${EVAL_DIR:-playground/data/eval}; OUT=${OUT:-ivtp_out/eval}; DTYPE=${DTYPE:-float16}
declare -A FOLDER=([vqav2]=vqav2 [gqa]=gqa [vizwiz]=vizwiz [sqa]=scienceqa [textvqa]=textvqa [pope]=pope
                   [mme]=MME [mmbench]=mmbench [mmbench_cn]=mmbench_cn [seed]=seed_bench
                   [llava_bench]=llava-bench-in-the-wild [mmvet]=mm-vet)
[[ -n "${FOLDER[$BENCH]:-}" ]] || { echo "unknown benchmark $BENCH (${!FOLDER[*]})" >&2; exit 2; }
if [[ "$TOKENS" == 576 ]]; then PRUNE=none; TAG=unpruned; else PRUNE=configs/methods/${METHOD}_${TOKENS}.yaml; TAG=${METHOD}_${TOKENS}; fi
[[ "$PRUNE" == none || -f "$PRUNE" ]] || { echo "no config $PRUNE" >&2; exit 2; }
IFS=',' read -ra GPUS <<< "${CUDA_VISIBLE_DEVICES:-0}"
NAME=$(basename "$MODEL")-$TAG
torchrun --standalone --nproc_per_node "${#GPUS[@]}" -m ivtp.cli eval --benchmark "$BENCH" \
    --data "$EVAL_DIR/${FOLDER[$BENCH]}" --model "$MODEL" --prune-config "$PRUNE" --dtype "$DTYPE" \
    --model-id "$NAME" --out "$OUT/$BENCH/$NAME" "$@"
