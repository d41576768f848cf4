#!/usr/bin/env bash
# LLaVA-1.5-7B LoRA instruction tuning with IVTP pruning active, on 8 GPUs: LoRA r 128, alpha 256 on the LLM's
# linear layers at lr 2e-4, the projector fully trained at 2e-5. Global batch 128 (8 x 16 x 1).
# The merged model is written to <output_dir>/merged. Usage as finetune.sh.
set -euo pipefail
PRUNE=${1:-configs/ivtp_64.yaml}; shift || true
deepspeed ${HOSTFILE:+--hostfile $HOSTFILE} train/finetune.py \
    --deepspeed configs/deepspeed/zero3.json \
    --model_name_or_path checkpoints/llava-v1.5-7b-pretrain-ivtp \
    --prune-config "$PRUNE" \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --data_path data/llava_v1_5_mix665k.json \
    --image_folder data \
    --template vicuna_v1 --image_aspect_ratio pad --group_by_modality_length True \
    --bf16 True --tf32 True \
    --output_dir checkpoints/llava-v1.5-7b-ivtp-lora \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 --gradient_accumulation_steps 1 \
    --learning_rate 2e-4 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
    --model_max_length 2048 --gradient_checkpointing True \
    --save_strategy steps --save_steps 50000 --save_total_limit 1 \
    --dataloader_num_workers 4 --logging_steps 1 --report_to wandb "$@"
