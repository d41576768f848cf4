"""Issue 17 probe: can the instruction find the object a colour question names ("What colour is the square?") in the
testbed's vision tower, patch by patch, before any LLM layer?

For scenes of a split no stage trained on, every patch's feature is taken to the aligner's joint space (the
post-layernorm and visual projection that eq. 6 applies to the [CLS], applied to each patch token instead, as
MaskCLIP reads a CLIP densely), at the last layer and at LLaVA's feature layer (-2), and also through the last
layer's value path alone (MaskCLIP's). Its cosine to the question's key word, read in the question as stage 2's
relevance reads it, ranks the patches. Reported: within each image, the AUC of the named object's patches against
the other objects' patches (0.5: no localisation), per key-word kind (shape words: colour questions; colour
words: shape questions), and the share of the top-k patches on the object (k = 7 of 64, the testbed's budget)
against the object's share of the image.

    python scripts/probe_dense_relevance.py --model testbed --scenes 300 --out docs/testbed/probe_dense.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch
from tqdm import tqdm

from ivtp.data.shapes import COLOURS, SHAPES, ask_colour, ask_shape, patches_of, render, scene_for
from ivtp.testbed.clip import auc


def dense_paths(tower, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 1 + N, D) post-layernormed tokens per reading: the last layer's output, the feature layer's (-2), and
    the last layer's value path (its attention replaced by each token's own value, MaskCLIP's dense reading)."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, then each layer
    last = tower.encoder.layers[-1]
    x = hidden[-2]
    v = last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(x)))
    y = x + v
    y = y + last.mlp(last.layer_norm2(y))
    post = tower.post_layernorm
    return {"last": post(hidden[-1]), "feature_layer": post(hidden[-2]), "value_path": post(y)}


def key_word_feature(aligner, question: str, word: str) -> torch.Tensor:
    """(E,) the unit joint-space feature of `word`'s CLIP token(s) read in the question (their mean)."""
    spans, feats = aligner.text_features([question])
    start = question.index(word)
    picked = [i for i, (a, b) in enumerate(spans[0]) if a < start + len(word) and b > start]
    return torch.nn.functional.normalize(feats[0, [1 + i for i in picked]].mean(0), dim=-1)


def linear_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression of labels y (M,) from features x (M, D), fitted on `train`."""
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x[train]), y[train]).backward()
        opt.step()
    with torch.no_grad():
        return float((head(x[~train]).argmax(-1) == y[~train]).float().mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="testbed")
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--split", default="probe_dense")  # a split name no stage trains on
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from ivtp.models import load_for_inference, preset_aligner

    model, processor = load_for_inference(args.model)  # unpruned: the tower reads every patch
    aligner, tower = preset_aligner(args.model), model.model.vision_tower
    size = processor.image_processor.crop_size["height"]
    rows: dict[str, dict[str, list]] = {}
    rng = random.Random(0)
    probe_x, probe_shape, probe_colour, probe_scene = [], [], [], []  # feature-layer patches inside one object
    for index in tqdm(range(args.scenes), desc="scenes"):
        scene = scene_for(0, args.split, index, size)
        pixels = processor.image_processor(render(scene), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            readings = dense_paths(tower, pixels)
            features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][0, 1:]  # (N, D)
        owners: dict[int, list[int]] = {}
        for i, o in enumerate(scene.objects):
            for patch in patches_of(o, size):
                owners.setdefault(patch, []).append(i)
        for patch, objs in owners.items():
            if len(objs) == 1:
                o = scene.objects[objs[0]]
                probe_x.append(features[patch])
                probe_shape.append(SHAPES.index(o.shape))
                probe_colour.append(sorted(COLOURS).index(o.colour))
                probe_scene.append(index)
        for ask, kind, attr in ((ask_colour, "shape word (colour questions)", "shape"),
                                (ask_shape, "colour word (shape questions)", "colour")):
            q = ask(scene, rng)
            if q is None:
                continue
            word = getattr(scene.objects[q["target"]], attr)
            text = q["question"]
            feature = key_word_feature(aligner, text, word)
            target = set(patches_of(scene.objects[q["target"]], size))
            others = set().union(*(patches_of(o, size) for i, o in enumerate(scene.objects) if i != q["target"]))
            others -= target
            if not others:
                continue
            for name, h in readings.items():
                joint = torch.nn.functional.normalize(aligner.image_features(h[0, 1:]).float(), dim=-1)  # (N, E)
                cos = joint @ feature  # (N,)
                t, o = sorted(target), sorted(others)
                top = cos.topk(args.k).indices.tolist()
                row = rows.setdefault(kind, {}).setdefault(name, [])
                row.append((auc(cos[t], cos[o]), len(target & set(top)) / args.k, len(target) / cos.numel(),
                            text))
    report = {}
    for kind, by_reading in rows.items():
        report[kind] = {name: {"questions": len(r), "auc_object_vs_other_objects": round(sum(x[0] for x in r) / len(r), 3),
                               f"top{args.k}_on_object": round(sum(x[1] for x in r) / len(r), 3),
                               "object_share_of_image": round(sum(x[2] for x in r) / len(r), 3)}
                        for name, r in by_reading.items()}
    x, scenes = torch.stack(probe_x).float(), torch.tensor(probe_scene)
    train = scenes < args.scenes // 2  # held out by scene
    report["one feature-layer patch inside one object: held-out linear probe accuracy"] = {
        "patches": len(probe_x),
        "shape (3 classes)": round(linear_probe(x, torch.tensor(probe_shape), train), 3),
        "colour (6 classes)": round(linear_probe(x, torch.tensor(probe_colour), train), 3)}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python scripts/probe_dense_relevance.py " + " ".join(sys.argv[1:] if argv is None else argv), **report}, f,
                      indent=1)
    return report


if __name__ == "__main__":
    main()
