"""LLaVA-1.5 instruction tuning (stage 2 of the recipe), with IVTP pruning active in the forward.

    deepspeed train/finetune.py --deepspeed configs/deepspeed/zero3.json \
        --model_name_or_path checkpoints/llava-v1.5-7b-pretrain --prune-config configs/ivtp_64.yaml \
        --data_path data/llava_v1_5_mix665k.json --image_folder data/images \
        --output_dir checkpoints/llava-v1.5-7b-ivtp ...        # scripts/v1_5/finetune.sh has the full recipe

Trains the projector and the LLM (vision tower frozen) on the 665K mix with the vicuna_v1 template; with
--lora_enable, LoRA adapters on the LLM's linear layers instead of the LLM itself. Every standard HF
TrainingArguments flag passes through. The output is a llava-hf checkpoint with ivtp_config.json beside it:
`ivtp.load_pruned(output_dir)` runs it for inference as trained.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ivtp.training import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:], template="vicuna_v1", tune="projector+llm")
