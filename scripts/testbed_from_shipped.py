"""A testbed folder built from the shipped testbed model, for the guidance measurements of docs/testbed.md
("Does the instruction guide?") on a machine that cannot retrain the testbed.

    python scripts/testbed_from_shipped.py OUT --data ivtp_out/testbed/data   # a folder the data stage wrote
    python -m ivtp.testbed.pipeline --out OUT --stages aligner                 # tune its aligner (about 12 min)
    python scripts/testbed_from_shipped.py OUT --attach                       # OUT/llava: the model + the tuned aligner
    ivtp ablate --testbed OUT --finetuned OUT/llava --suites extensions,guidance --limit 700

OUT/clip/vision is the shipped model's vision tower (fp32), OUT/clip/aligner.* its aligner (or --aligner FILE),
OUT/data a link to the data folder (the aligner stage reads its training images). The shipped aligner is the tuned
one since 2026-12-03; the contrastive one the measurements started from is in git:
    git show 1fca5df:ivtp/assets/testbed/llava-ivtp/aligner.safetensors > contrastive.safetensors
"""

import argparse
import os
import shutil

from ivtp.models import TESTBED_MODEL, load_model
from ivtp.testbed.clip import image_processor
from ivtp.names import ALIGNER_FILE, ALIGNER_META


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--data", help="a testbed data folder (the pipeline's data stage)")
    p.add_argument("--aligner", default=os.path.join(TESTBED_MODEL, ALIGNER_FILE), help="the aligner to start from")
    p.add_argument("--attach", action="store_true", help="copy the model with OUT/clip's aligner to OUT/llava")
    args = p.parse_args()
    clip = os.path.join(args.out, "clip")
    if args.attach:
        dst = os.path.join(args.out, "llava")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(TESTBED_MODEL, dst)
        for name in (ALIGNER_FILE, ALIGNER_META):
            shutil.copy(os.path.join(clip, name), os.path.join(dst, name))
        return
    if not args.data:
        p.error("--data is needed to build the folder")
    from transformers import CLIPVisionModel

    model, _ = load_model(TESTBED_MODEL)
    tower = model.model.vision_tower.float()
    vision = CLIPVisionModel(tower.config)
    vision.load_state_dict(tower.state_dict())
    vision.save_pretrained(os.path.join(clip, "vision"))
    image_processor(tower.config.image_size).save_pretrained(os.path.join(clip, "vision"))
    shutil.copy(args.aligner, os.path.join(clip, ALIGNER_FILE))
    shutil.copy(os.path.join(TESTBED_MODEL, ALIGNER_META), os.path.join(clip, ALIGNER_META))
    os.symlink(os.path.abspath(args.data), os.path.join(args.out, "data"))


if __name__ == "__main__":
    main()
