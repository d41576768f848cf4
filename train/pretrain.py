"""LLaVA-1.5 feature-alignment pretraining (stage 1 of the recipe): the projector alone, on the 558K captions.

    deepspeed train/pretrain.py --deepspeed configs/deepspeed/zero2.json \
        --model_name_or_path lmsys/vicuna-7b-v1.5 --vision_tower openai/clip-vit-large-patch14-336 \
        --prune-config configs/ivtp_64.yaml --data_path data/blip_laion_cc_sbu_558k.json \
        --image_folder data/images/pretrain --output_dir checkpoints/llava-v1.5-7b-pretrain ...
                                                               # scripts/v1_5/pretrain.sh has the full recipe

With --vision_tower, a new LLaVA is assembled from the LLM and the CLIP tower (a fresh projector); otherwise
--model_name_or_path names a llava-hf checkpoint or a preset. The `plain` template supervises the caption only.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ivtp.training import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:], template="plain", tune="projector")
