"""Write the small training fixtures in data/fixtures (used by `make train-smoke` and the tests).

    python scripts/make_fixtures.py

Six 112 px scenes of coloured shapes, a vicuna_v1 instruction file (image and text-only samples, one and two
rounds) and a plain caption file, all deterministic.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ivtp.data.shapes import draw_scene  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fixtures")


def main() -> None:
    os.makedirs(os.path.join(OUT, "images"), exist_ok=True)
    instruct, captions = [], []
    for seed in range(6):
        image, objects = draw_scene(seed=seed, size=112, n_objects=3)
        name = f"scene{seed}.png"
        image.save(os.path.join(OUT, "images", name))
        first, second = objects[0], objects[1]
        instruct.append({"id": f"scene{seed}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is the {first.shape}?"},
            {"from": "gpt", "value": first.colour},
            {"from": "human", "value": f"Is there a {second.colour} {second.shape}?"},
            {"from": "gpt", "value": "Yes"},
        ]})
        names = ", ".join(f"a {o.colour} {o.shape}" for o in objects)
        captions.append({"id": f"cap{seed}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": names},
        ]})
    instruct.append({"id": "text0", "conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}]})
    for name, data in (("tiny_llava.json", instruct), ("tiny_pretrain.json", captions)):
        with open(os.path.join(OUT, name), "w") as f:
            json.dump(data, f, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
