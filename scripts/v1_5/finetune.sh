#!/usr/bin/env bash
# LLaVA-1.5-7B instruction tuning with IVTP pruning active (projector + LLM; vision tower frozen), on 8 GPUs.
# Global batch 128 = 8 GPUs x 16 per GPU x 1 accumulation step; for N GPUs keep the product at 128
# (4 GPUs: --gradient_accumulation_steps 2). Multi-node: HOSTFILE=hostfile bash scripts/v1_5/finetune.sh.
# Usage: bash scripts/v1_5/finetune.sh [PRUNE_CONFIG] [extra HF TrainingArguments...]
set -euo pipefail
PRUNE=${1:-configs/ivtp_64.yaml}; shift || true
deepspeed ${HOSTFILE:+--hostfile $HOSTFILE} train/finetune.py \
    --deepspeed configs/deepspeed/zero3.json \
    --model_name_or_path checkpoints/llava-v1.5-7b-pretrain-ivtp \
    --prune-config "$PRUNE" \
    --data_path data/llava_v1_5_mix665k.json \
    --image_folder data \
    --template vicuna_v1 --image_aspect_ratio pad --group_by_modality_length True \
    --bf16 True --tf32 True \
    --output_dir checkpoints/llava-v1.5-7b-ivtp \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 --gradient_accumulation_steps 1 \
    --learning_rate 2e-5 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
    --model_max_length 2048 --gradient_checkpointing True \
    --save_strategy steps --save_steps 50000 --save_total_limit 1 \
    --dataloader_num_workers 4 --logging_steps 1 --report_to wandb "$@"
