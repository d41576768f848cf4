"""Linear probes of a vision tower: can an object's shape and colour be read from its patch features?

The testbed's LLaVA can only answer what the tower encodes. This measures it directly (docs/testbed.md):

    python -m ivtp.testbed.probe ivtp_out/testbed/clip/vision [more towers ...]

For fresh scenes of their own split ("probe"), each object's feature is the mean of the tower's hidden states over
the patches its box overlaps, at one layer (LLaVA's -2 by default). A logistic regression per attribute, its L2
weight chosen on a validation fifth of the fitting scenes, is scored on the held-out scenes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ivtp.data.shapes import COLOURS, SHAPES, patches_of, render, scene_for

PROBE_SPLIT = "probe"


def object_features(tower, n_scenes: int, seed: int = 0, layer: int = -2, batch_size: int = 100):
    """(features (n_obj, D), shape labels, colour labels, scene index per object) for `n_scenes` probe scenes.

    tower: an HF CLIPVisionModel taking the testbed's 112 px images."""
    from ivtp.testbed.clip import normalize_images

    scenes = [scene_for(seed, PROBE_SPLIT, i) for i in range(n_scenes)]
    feats, shapes, colours, owner = [], [], [], []
    with torch.no_grad():
        for start in range(0, n_scenes, batch_size):
            chunk = scenes[start: start + batch_size]
            pixels = torch.stack([torch.from_numpy(np.asarray(render(s)).copy()).permute(2, 0, 1) for s in chunk])
            hidden = tower(pixel_values=normalize_images(pixels), output_hidden_states=True).hidden_states[layer]
            for j, scene in enumerate(chunk):  # hidden: (B, 1 + P, D), [CLS] first
                for obj in scene.objects:
                    patches = torch.tensor(patches_of(obj, scene.size)) + 1
                    feats.append(hidden[j, patches].float().mean(0))  # (D,)
                    shapes.append(SHAPES.index(obj.shape))
                    colours.append(list(COLOURS).index(obj.colour))
                    owner.append(start + j)
    return torch.stack(feats), torch.tensor(shapes), torch.tensor(colours), torch.tensor(owner)


def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L2 penalty, by L-BFGS. x: (N, D) standardised, y: (N,)."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe_accuracy(x_fit, y_fit, x_test, y_test, classes: int, l2s=(1e-4, 1e-3, 1e-2)) -> float:
    """Test accuracy of a logistic regression whose L2 weight is picked on the last fifth of the fitting rows."""
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mu) / sd, (x_test - mu) / sd
    n_val = max(1, len(x_fit) // 5)

    def accuracy(w, b, x, y):
        return float(((x @ w + b).argmax(-1) == y).float().mean())

    best = max(l2s, key=lambda l2: accuracy(*_fit(x_fit[:-n_val], y_fit[:-n_val], classes, l2), x_fit[-n_val:],
                                            y_fit[-n_val:]))
    return accuracy(*_fit(x_fit, y_fit, classes, best), x_test, y_test)


def probe_tower(tower, n_scenes: int = 2000, fit_fraction: float = 0.75, seed: int = 0, layer: int = -2) -> dict:
    """Shape and colour probe accuracies (fit on the first scenes, test on the rest) and the majority baselines."""
    x, shapes, colours, owner = object_features(tower, n_scenes, seed, layer)
    fit = owner < int(n_scenes * fit_fraction)
    out = {"layer": layer, "n_scenes": n_scenes, "objects_fit": int(fit.sum()), "objects_test": int((~fit).sum())}
    for name, y, k in (("shape", shapes, len(SHAPES)), ("colour", colours, len(COLOURS))):
        out[name] = linear_probe_accuracy(x[fit], y[fit], x[~fit], y[~fit], k)
        out[f"{name}_majority"] = float(torch.bincount(y[~fit], minlength=k).max() / int((~fit).sum()))
    return out


def main(argv=None) -> int:
    from transformers import CLIPVisionModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("towers", nargs="+", help="HF CLIPVisionModel folders (a testbed's clip/vision)")
    p.add_argument("--scenes", type=int, default=2000)
    p.add_argument("--layer", type=int, default=-2)
    args = p.parse_args(argv)
    for path in args.towers:
        tower = CLIPVisionModel.from_pretrained(path).eval()
        print(json.dumps({"tower": path, **probe_tower(tower, args.scenes, layer=args.layer)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
