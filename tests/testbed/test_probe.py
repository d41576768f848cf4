"""The tower probe: a logistic regression that must find a planted signal and not invent one."""

import torch

from ivtp.testbed.clip import build_clip, to_hf_vision
from ivtp.testbed.probe import linear_probe_accuracy, object_features, probe_tower


def test_probe_reads_a_planted_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (400,), generator=g)
    noise = torch.randn(400, 16, generator=g)
    planted = noise.clone()
    planted[:, 3] += 4.0 * y  # one feature carries the class
    assert linear_probe_accuracy(planted[:300], y[:300], planted[300:], y[300:], 3) > 0.95
    assert linear_probe_accuracy(noise[:300], y[:300], noise[300:], y[300:], 3) < 0.55  # chance is about 1/3


def test_object_features_are_the_mean_of_each_objects_patches():
    from ivtp.data.shapes import patches_of, scene_for

    tower = to_hf_vision(build_clip(seed=0)).eval()
    x, shapes, colours, owner = object_features(tower, n_scenes=3, batch_size=2)
    scenes = [scene_for(0, "probe", i) for i in range(3)]
    assert len(x) == sum(len(s.objects) for s in scenes) == len(shapes) == len(colours)
    assert owner.tolist() == [i for i, s in enumerate(scenes) for _ in s.objects]
    out = probe_tower(tower, n_scenes=12)
    assert out["objects_fit"] + out["objects_test"] == sum(len(scene_for(0, "probe", i).objects) for i in range(12))
    for key in ("shape", "colour", "shape_majority", "colour_majority"):
        assert 0.0 <= out[key] <= 1.0
    # the first object's feature, recomputed by hand from the tower's layer -2
    from ivtp.data.shapes import render
    from ivtp.testbed.clip import normalize_images
    import numpy as np

    pixels = torch.from_numpy(np.asarray(render(scenes[0])).copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        h = tower(pixel_values=normalize_images(pixels), output_hidden_states=True).hidden_states[-2][0]
    obj = scenes[0].objects[0]
    want = h[[p + 1 for p in patches_of(obj, scenes[0].size)]].mean(0)
    assert torch.allclose(x[0], want, atol=1e-5)
