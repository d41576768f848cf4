#!/usr/bin/env bash
# LLaVA-1.5-7B LoRA instruction tuning with IVTP pruning active, on 8 GPUs: finetune.sh's recipe with LoRA r 128,
# alpha 256 on the LLM's linear layers at lr 2e-4, the projector fully trained at 2e-5. Global batch 128 (8 x 16 x 1).
# The merged model is written to <output_dir>/merged. Usage as finetune.sh (later flags override earlier ones).
set -euo pipefail
PRUNE=${1:-configs/ivtp_64.yaml}; shift || true
exec bash "$(dirname "$0")/finetune.sh" "$PRUNE" \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --learning_rate 2e-4 \
    --output_dir checkpoints/llava-v1.5-7b-ivtp-lora "$@"
