#!/usr/bin/env bash
# LLaVA-1.5-7B feature-alignment pretraining with IVTP pruning active, on 8 GPUs.
# Global batch 256 = 8 GPUs x 32 per GPU x 1 accumulation step. For N GPUs keep the product at 256:
# e.g. 4 GPUs: --per_device_train_batch_size 32 --gradient_accumulation_steps 2 (docs/training.md).
# Usage: bash scripts/v1_5/pretrain.sh [PRUNE_CONFIG] [extra HF TrainingArguments...]
set -euo pipefail
PRUNE=${1:-configs/ivtp_64.yaml}; shift || true
deepspeed ${HOSTFILE:+--hostfile $HOSTFILE} train/pretrain.py \
    --deepspeed configs/deepspeed/zero2.json \
    --model_name_or_path lmsys/vicuna-7b-v1.5 \
    --vision_tower openai/clip-vit-large-patch14-336 \
    --prune-config "$PRUNE" \
    --data_path data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \
    --image_folder data/LLaVA-Pretrain/images \
    --template plain \
    --bf16 True --tf32 True \
    --output_dir checkpoints/llava-v1.5-7b-pretrain-ivtp \
    --num_train_epochs 1 \
    --per_device_train_batch_size 32 --gradient_accumulation_steps 1 \
    --learning_rate 1e-3 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
    --model_max_length 2048 --gradient_checkpointing True \
    --save_strategy steps --save_steps 24000 --save_total_limit 1 \
    --dataloader_num_workers 4 --logging_steps 1 --report_to wandb "$@"
