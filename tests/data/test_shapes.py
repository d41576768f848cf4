"""The synthetic shapes testbed: scenes, rendering, oracle patches, captions, questions and the written files."""

import csv
import hashlib
import json
import os
import random
from collections import Counter

import numpy as np
import pytest

from ivtp.data import shapes
from ivtp.data.check import check_file
from ivtp.data.shapes import (
    ANSWER_SUFFIX, COLOURS, POPE_SETTINGS, QTYPES, SHAPES, Scene, ShapeObject, absent_pairs, ask_count,
    ask_existence, caption, draw_scene, generate_testbed, patches_of, pope_questions, questions, render,
    sample_scene, scene_for, short_caption, side_of, target_patches,
)
from ivtp.data.templates import render as render_template

N_TRAIN, N_EVAL, SEED = 30, 12, 7


def pixels_hash(image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("testbed"))
    manifest = generate_testbed(out, N_TRAIN, N_EVAL, SEED, workers=1, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def many_scenes():
    return [scene_for(0, "train", i) for i in range(300)]


def hand_scene() -> Scene:
    # red circle top left, red square top right, blue triangle bottom left
    return Scene(112, [ShapeObject("red", "circle", (4, 4, 24, 24)), ShapeObject("red", "square", (80, 10, 100, 30)),
                       ShapeObject("blue", "triangle", (10, 80, 30, 100))], "noise", 5)


def test_draw_scene_unchanged():
    image, objects = draw_scene(seed=0, size=112, n_objects=3)
    assert pixels_hash(image) == "f88c6c63349388d9eee558a8e2a218849670cbb8c04a4a62d1e80ae5849df982"
    assert objects == [ShapeObject("red", "circle", (49, 21, 68, 40)),
                       ShapeObject("orange", "square", (72, 51, 88, 67)),
                       ShapeObject("blue", "circle", (6, 52, 32, 78))]


def test_scene_and_pixels_deterministic():
    a, b = scene_for(3, "train", 17), scene_for(3, "train", 17)
    assert a == b
    assert pixels_hash(render(a)) == pixels_hash(render(b))
    assert scene_for(4, "train", 17) != a and scene_for(3, "gqa", 17) != a
    assert sample_scene(random.Random(5)) == sample_scene(5)


def test_scenes_distinct_pairs_no_overlap_varied(many_scenes):
    sides, backgrounds, counts = set(), Counter(), Counter()
    for s in many_scenes:
        assert s.size == 112 and 3 <= len(s.objects) <= 6
        assert len(s.pairs()) == len(s.objects)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112 and x1 - x0 == y1 - y0
            assert o.colour in COLOURS and o.shape in SHAPES
            sides.add(x1 - x0)
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                assert (a.box[2] + shapes.GAP <= b.box[0] or b.box[2] + shapes.GAP <= a.box[0]
                        or a.box[3] + shapes.GAP <= b.box[1] or b.box[3] + shapes.GAP <= a.box[1])
        backgrounds[s.background] += 1
        counts[len(s.objects)] += 1
    assert min(sides) == 10 and max(sides) == 22
    assert set(backgrounds) == set(shapes.BACKGROUNDS) and set(counts) == {3, 4, 5, 6}


def test_patches_of_hand_computed():
    assert patches_of(ShapeObject("red", "square", (10, 20, 40, 30)), 112) == [8, 9, 10, 16, 17, 18]
    assert patches_of(ShapeObject("red", "square", (14, 14, 28, 28)), 112) == [9]
    assert patches_of(ShapeObject("red", "square", (100, 100, 112, 112)), 112) == [63]
    assert patches_of(ShapeObject("red", "square", (27, 0, 29, 2)), 112) == [1, 2]
    scene = hand_scene()
    q = {"targets": [0, 2]}
    assert target_patches(scene, q) == [0, 1, 8, 9, 40, 41, 42, 48, 49, 50, 56, 57, 58]


def test_render_colours_and_texture():
    scene = hand_scene()
    image = render(scene)
    assert image.size == (112, 112) and image.mode == "RGB"
    px = np.asarray(image).astype(int)
    for o in scene.objects:
        cy, cx = (o.box[1] + o.box[3]) // 2, (o.box[0] + o.box[2]) // 2
        assert np.abs(px[cy, cx] - np.array(COLOURS[o.colour])).max() <= 15
    # the circle's box corner is background; the square's corner is the square
    assert np.abs(px[4, 4] - np.array(COLOURS["red"])).max() > 60
    assert np.abs(px[10, 80] - np.array(COLOURS["red"])).max() <= 15
    for kind in shapes.BACKGROUNDS:  # every patch is textured, and the background is low-contrast
        bg = np.asarray(render(Scene(112, [], kind, 11))).astype(float)
        patches = bg.reshape(8, 14, 8, 14, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
        assert patches.std(axis=1).min() > 1.0
        assert 40 < bg.mean() < 180 and bg.max() - bg.min() < 110


def parse_pair(text: str) -> tuple[str | None, str | None]:
    words = text.rstrip("?").replace("s ", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


def test_questions_answers_match_scene(many_scenes):
    seen = Counter()
    for n, scene in enumerate(many_scenes):
        rng = random.Random(n)
        for q in questions(scene, rng, {t: 2 for t in QTYPES}) + [ask_count(scene, rng, p_absent=0.5, p_all=0.3)]:
            seen[q["qtype"]] += 1
            colour, shape = parse_pair(q["question"])
            t, a = q["qtype"], q["answer"]
            if t == "colour":
                assert colour is None and len(scene.find(shape=shape)) == 1  # asked only when unambiguous
                assert scene.find(shape=shape) == q["targets"] == [q["target"]]
                assert a == scene.objects[q["target"]].colour
            elif t == "shape":
                assert shape is None and len(scene.find(colour=colour)) == 1
                assert scene.find(colour=colour) == q["targets"] and a == scene.objects[q["target"]].shape
            elif t == "position":
                (i,) = scene.find(colour, shape)
                o = scene.objects[i]
                centre = ((o.box[0] + o.box[2]) / 2) if a in ("left", "right") else ((o.box[1] + o.box[3]) / 2)
                assert abs(centre - 56) >= 14 and a == (("left", "right") if a in ("left", "right")
                                                          else ("top", "bottom"))[centre > 56]
                assert q["targets"] == [i]
            elif t == "count":
                expected = scene.find(colour, shape)
                assert a == str(len(expected)) and q["targets"] == expected
            elif t == "existence":
                present = (colour, shape) in scene.pairs()
                assert a == ("yes" if present else "no") and q["pair"] == [colour, shape]
                if present:
                    assert q["targets"] == scene.find(colour, shape) == [q["target"]]
                else:
                    assert q["target"] is None
                    assert all((scene.objects[i].colour == colour) != (scene.objects[i].shape == shape)
                               for i in q["targets"])
            assert len(a.split()) == 1
    assert set(seen) == set(QTYPES) and min(seen.values()) > 200


def test_count_and_existence_cover_zero_and_no():
    scene = hand_scene()
    answers = Counter(ask_count(scene, random.Random(i), p_absent=0.5, p_all=0.2)["answer"] for i in range(300))
    assert set(answers) == {"0", "1", "2", "3"}  # 3 is "How many objects"
    exist = Counter(ask_existence(scene, random.Random(i))["answer"] for i in range(400))
    assert 160 < exist["yes"] < 240 and exist["yes"] + exist["no"] == 400
    assert ask_existence(scene, random.Random(0), answer="no", setting="adversarial")["targets"] != []


def test_side_of_margin():
    o = ShapeObject("red", "circle", (30, 70, 40, 80))  # centre (35, 75)
    assert side_of(o, 112, "x") == "left" and side_of(o, 112, "y") == "bottom"
    assert side_of(ShapeObject("red", "circle", (40, 0, 50, 10)), 112, "x") is None  # centre 45: 11 px < 14


def test_object_regions_labels():
    from ivtp.data.shapes import COLOURS, POSITIONS, SHAPES, coarse_position, object_regions

    scene = scene_for(0, "train", 1)
    regions = object_regions(0, 2, labels=("position", "colour", "shape"))[1]
    assert [labels for labels, _ in regions] == [
        (POSITIONS.index(coarse_position(o, 112)), list(COLOURS).index(o.colour), SHAPES.index(o.shape))
        for o in scene.objects]
    assert [p for _, p in regions] == [patches_of(o, 112) for o in scene.objects]
    with pytest.raises(ValueError, match="choose from shape, colour, position"):
        object_regions(0, 1, labels=("size",))
    with pytest.raises(ValueError, match="at least one label"):
        object_regions(0, 1, labels=())


def test_pope_hand_scene_settings():
    scene = hand_scene()
    frequency = Counter({("green", "circle"): 10, ("yellow", "square"): 8, ("purple", "triangle"): 5,
                         ("red", "circle"): 99, ("blue", "circle"): 1})
    assert absent_pairs(scene, "popular", 0, 3, frequency) == [("green", "circle"), ("yellow", "square"),
                                                                ("purple", "triangle")]
    # red triangle shares with all three objects; blue circle and blue square with two; all others with one
    assert sorted(absent_pairs(scene, "adversarial", 0, 3)) == [("blue", "circle"), ("blue", "square"),
                                                                 ("red", "triangle")]
    assert absent_pairs(scene, "adversarial", 1, 1) == [("red", "triangle")]
    qs = pope_questions(scene, "popular", 0, frequency)
    assert [q["answer"] for q in qs] == ["yes", "no"] * 3
    assert [q["question"] for q in qs if q["answer"] == "no"] == [
        "Is there a green circle in the image?", "Is there a yellow square in the image?",
        "Is there a purple triangle in the image?"]
    assert {tuple(q["pair"]) for q in qs if q["answer"] == "yes"} == scene.pairs()


def test_pope_balanced_and_adversarial_share(many_scenes):
    frequency = shapes.pair_frequency(many_scenes)
    for n, scene in enumerate(many_scenes[:100]):
        for setting in POPE_SETTINGS:
            qs = pope_questions(scene, setting, random.Random(n), frequency)
            k = min(3, len(scene.objects))
            assert [q["answer"] for q in qs] == ["yes", "no"] * k
            assert len({q["question"] for q in qs}) == 2 * k
            for q in qs:
                assert (tuple(q["pair"]) in scene.pairs()) == (q["answer"] == "yes") and q["category"] == setting
                if setting == "adversarial" and q["answer"] == "no":
                    c, s = q["pair"]
                    assert any(o.colour == c or o.shape == s for o in scene.objects)


def test_captions_name_every_object(many_scenes):
    for n, scene in enumerate(many_scenes[:100]):
        rng = random.Random(n)
        long, short = caption(scene, rng), short_caption(scene, rng, p_background=1.0)
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in long and f"{o.colour} {o.shape}" in short
        assert len(short.replace(",", " ,").split()) <= 27  # within 30 CLIP BPE tokens
        assert short.endswith(f"on a {shapes.BACKGROUND_WORDS[scene.background]} background")
    assert short_caption(hand_scene(), random.Random(0), p_background=0.0) in {
        "a red circle, a red square and a blue triangle", "a red circle, a blue triangle and a red square",
        "a red square, a red circle and a blue triangle", "a red square, a blue triangle and a red circle",
        "a blue triangle, a red circle and a red square", "a blue triangle, a red square and a red circle"}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_llava_files(testbed):
    out, manifest = testbed
    pretrain = json.load(open(os.path.join(out, "pretrain.json")))
    finetune = json.load(open(os.path.join(out, "finetune.json")))
    assert len(pretrain) == len(finetune) == N_TRAIN
    assert pretrain[3]["id"] == finetune[3]["id"] == "train_000003"
    assert pretrain[3]["image"] == finetune[3]["image"] == "images/train_000003.png"
    qtypes = Counter()
    for rec in pretrain:
        assert set(rec) == {"id", "image", "conversations"} and len(rec["conversations"]) == 2
        assert rec["conversations"][0]["value"].startswith("<image>\n")
        text = render_template("plain", rec["conversations"], "</s>").text
        assert text == "<image>" + rec["conversations"][1]["value"] + "\n"
    for rec in finetune:
        conv = rec["conversations"]
        assert set(rec) == {"id", "image", "conversations"} and len(conv) >= 8
        humans, answers = conv[0::2], conv[1::2]
        assert humans[0]["value"].startswith("<image>\n")
        assert all("<image>" not in h["value"] for h in humans[1:])
        assert all(h["value"].endswith(ANSWER_SUFFIX) for h in humans)
        assert all(len(a["value"].split()) == 1 for a in answers)
        render_template("vicuna_v1", conv, "</s>")
        qtypes.update("count" if a["value"].isdigit() else "yesno" if a["value"] in ("yes", "no") else "other"
                      for a in answers)
    assert qtypes["count"] == manifest["counts"]["finetune_questions"]["count"] == N_TRAIN
    assert qtypes["yesno"] == manifest["counts"]["finetune_questions"]["existence"] == 2 * N_TRAIN
    report = check_file(os.path.join(out, "finetune.json"), out, progress=False)
    assert report.ok and report.with_image == N_TRAIN
    assert check_file(os.path.join(out, "pretrain.json"), out, template="plain", progress=False).ok


def test_clip_tsv(testbed):
    out, _ = testbed
    with open(os.path.join(out, "clip_train.tsv"), newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == N_TRAIN and list(rows[0]) == ["filepath", "title"]
    assert rows[5]["filepath"] == os.path.abspath(os.path.join(out, "images", "train_000005.png"))
    assert all(os.path.isfile(r["filepath"]) for r in rows)
    assert rows[5]["title"] == short_caption(scene_for(SEED, "train", 5),
                                             random.Random(shapes.derive_seed(SEED, "train", 5, "clip")))


def test_gqa_files(testbed):
    out, manifest = testbed
    root = os.path.join(out, "eval", "gqa")
    rows = read_jsonl(os.path.join(root, "llava_gqa_testdev_balanced.jsonl"))
    official = json.load(open(os.path.join(root, "testdev_balanced_questions.json")))
    assert [r["question_id"] for r in rows] == list(official) == [str(i) for i in range(len(rows))]
    assert len(rows) == sum(manifest["counts"]["gqa"].values()) and manifest["counts"]["gqa"]["count"] == N_EVAL
    for r in rows:
        assert set(r) == {"question_id", "image", "text", "category"} and r["category"] == "default"
        e = official[r["question_id"]]
        assert set(e) == {"imageId", "question", "answer", "fullAnswer", "types", "isBalanced", "target_patches",
                          "targets"}
        assert r["text"] == e["question"] + ANSWER_SUFFIX and r["image"] == e["imageId"] + ".png"
        assert os.path.isfile(os.path.join(root, "images", r["image"]))
        assert e["types"]["structural"] == ("verify" if e["answer"] in ("yes", "no") else "query")
        assert e["types"]["detailed"] in QTYPES and e["isBalanced"] is True
        scene = scene_for(SEED, "gqa", int(e["imageId"].split("_")[1]))
        assert e["target_patches"] == target_patches(scene, e)
    exist = Counter(e["answer"] for e in official.values() if e["types"]["detailed"] == "existence")
    assert exist == {"yes": N_EVAL // 2, "no": N_EVAL // 2}


def test_pope_files(testbed):
    out, manifest = testbed
    root = os.path.join(out, "eval", "pope")
    rows = read_jsonl(os.path.join(root, "llava_pope_test.jsonl"))
    ids = [r["question_id"] for r in rows]
    assert ids == list(range(1, len(rows) + 1))
    for setting in POPE_SETTINGS:
        labels = read_jsonl(os.path.join(root, "coco", f"coco_pope_{setting}.json"))
        mine = [r for r in rows if r["category"] == setting]
        assert [x["question_id"] for x in labels] == [r["question_id"] for r in mine]
        assert all(r["text"] == x["text"] + ANSWER_SUFFIX and r["image"] == x["image"] for r, x in zip(mine, labels))
        assert all(set(x) == {"question_id", "image", "text", "label", "target_patches"} for x in labels)
        n = Counter(x["label"] for x in labels)
        assert n["yes"] == n["no"] == 3 * N_EVAL
        assert manifest["counts"]["pope"][setting] == {"no": 3 * N_EVAL, "yes": 3 * N_EVAL}
    assert all(os.path.isfile(os.path.join(root, "val2014", r["image"])) for r in rows)


def test_eval_and_train_images_disjoint(testbed):
    out, _ = testbed
    folders = {"train": os.path.join(out, "images"), "gqa": os.path.join(out, "eval", "gqa", "images"),
               "pope": os.path.join(out, "eval", "pope", "val2014")}
    hashes = {}
    for split, folder in folders.items():
        names = sorted(os.listdir(folder))
        assert len(names) == (N_TRAIN if split == "train" else N_EVAL) and all(n.startswith(split) for n in names)
        hashes[split] = {hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in names}
        assert len(hashes[split]) == len(names)
    assert not (hashes["train"] & hashes["gqa"]) and not (hashes["train"] & hashes["pope"])
    assert not (hashes["gqa"] & hashes["pope"])


def test_testbed_byte_identical(testbed, tmp_path):
    out, manifest = testbed
    again = generate_testbed(str(tmp_path), N_TRAIN, N_EVAL, SEED, workers=1, progress=False)
    assert again == manifest
    for rel in ("pretrain.json", "finetune.json", "manifest.json", "eval/gqa/llava_gqa_testdev_balanced.jsonl",
                "eval/gqa/testdev_balanced_questions.json", "eval/pope/llava_pope_test.jsonl",
                "eval/pope/coco/coco_pope_adversarial.json"):
        assert open(os.path.join(out, rel), "rb").read() == open(os.path.join(tmp_path, rel), "rb").read(), rel
    from PIL import Image

    for rel in ("images/train_000000.png", "images/train_000029.png", "eval/pope/val2014/pope_000011.png"):
        assert pixels_hash(Image.open(os.path.join(out, rel))) == pixels_hash(Image.open(os.path.join(tmp_path, rel)))
    assert manifest["n_train"] == N_TRAIN and manifest["seed"] == SEED and manifest["image_size"] == 112


def test_write_llava_split_and_clip_captions_share_images(tmp_path):
    path = shapes.write_llava_split(str(tmp_path), 5, SEED, "finetune")
    assert path == os.path.join(str(tmp_path), "finetune.json") and len(json.load(open(path))) == 5
    from PIL import Image

    image = Image.open(os.path.join(tmp_path, "images", "train_000004.png"))
    assert pixels_hash(image) == pixels_hash(render(scene_for(SEED, "train", 4)))
    tsv = shapes.write_clip_captions(str(tmp_path / "c.tsv"), 5, SEED, str(tmp_path / "images"), captions_per_image=2)
    assert open(tsv).read().count("\n") == 11
    with pytest.raises(ValueError, match="kind"):
        shapes.write_llava_split(str(tmp_path), 1, SEED, "eval")


def test_png_bytes_round_trip():
    import io

    from PIL import Image

    pixels = np.asarray(render(scene_for(0, "train", 3)))
    decoded = Image.open(io.BytesIO(shapes.png_bytes(pixels)))
    assert decoded.mode == "RGB" and decoded.size == (112, 112)
    assert np.array_equal(np.asarray(decoded), pixels)
    odd = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(shapes.png_bytes(odd, level=9)))), odd)


def test_web_captions_claim_only_what_their_scene_holds():
    """Every claim of a web caption is true of its own scene, ends at a word of the text, and grows word by word;
    the vectorised truth (ITEMS) agrees with Description.true_of on other scenes."""
    rng = random.Random(0)
    kinds = Counter()
    others = [shapes.scene_for(0, "train", 1000 + i) for i in range(20)]
    for i in range(300):
        scene = shapes.scene_for(0, "train", i)
        desc = shapes.web_caption(scene, rng)
        assert desc.claims and desc.claims[-1][0] <= len(desc.text)
        previous = ()
        for end, items in desc.claims:
            assert desc.text[end - 1].isalpha() and (end == len(desc.text) or not desc.text[end].isalpha())
            assert shapes.Description.true_of(items, scene)
            assert items[: len(previous) - 1] == previous[: len(previous) - 1]  # only the last item may sharpen
            previous = items
        words = set(desc.text.replace(",", " ").replace(":", " ").split())
        assert words <= {w for phrase in shapes.web_caption_words() for w in phrase.replace(":", " ").split()}
        kinds[len(desc.claims[-1][1])] += 1
        for other in others:
            present = shapes.scene_items(other)
            vectorised = all(present[shapes.ITEM_INDEX[item]] for item in desc.claims[-1][1])
            assert vectorised == shapes.Description.true_of(desc.claims[-1][1], other)
    assert kinds[1] > 100 and max(kinds) >= 3  # mostly single things, some whole scenes
    bare = shapes._described([("a circle", (None, "circle"))])
    assert bare.text == "a circle" and bare.claims == [(8, ((None, "circle"),))]
    framed = shapes._described([("the circle", (None, "circle"))], "what is the", "on the left")
    assert framed.text == "what is the the circle on the left" and framed.claims == [(22, ((None, "circle"),))]
    pair = shapes._described([("the red square", ("red", "square")), ("blue", ("blue", None))])
    assert pair.text == "the red square and blue"
    assert pair.claims == [(7, (("red", None),)), (14, (("red", "square"),)),
                           (23, (("red", "square"), ("blue", None)))]
