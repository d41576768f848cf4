"""The training data pieces: the modality sampler, the collator, ivtp data check."""

import json
import os

import torch

from ivtp.cli import main
from ivtp.data.llava import Collator, ModalityLengthGroupedSampler, expand_to_square

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "fixtures", "tiny_llava.json")
IMAGES = os.path.join(ROOT, "data", "fixtures", "images")


def test_modality_sampler_never_mixes_kinds_within_a_batch_but_the_leftover():
    lengths = [100 + i for i in range(37)] + [-(5 + i) for i in range(23)]  # 37 image, 23 text-only samples
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(60))  # a permutation: every sample once
    batches = [order[i : i + 8] for i in range(0, 60, 8)]
    mixed = [k for k, b in enumerate(batches) if len({lengths[i] > 0 for i in b}) > 1]
    # Only the leftovers of each kind (5 image + 7 text-only samples here) come last and may share a batch.
    assert all(k >= len(batches) - 2 for k in mixed)
    assert all(len({lengths[i] > 0 for i in b}) == 1 for b in batches[:-2])
    sampler.set_epoch(1)
    assert list(sampler) != order  # reshuffled per epoch


def test_collator_right_pads_and_stacks_only_present_images():
    items = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6]),
              "pixel_values": torch.zeros(3, 4, 4)},
             {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7])}]
    batch = Collator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (1, 3, 4, 4)


def test_pad_to_square_centres_on_the_mean_colour():
    from PIL import Image

    img = expand_to_square(Image.new("RGB", (4, 2), (255, 0, 0)), (10, 20, 30))
    assert img.size == (4, 4)
    assert img.getpixel((0, 0)) == (10, 20, 30) and img.getpixel((0, 1)) == (255, 0, 0)


def test_data_check_reports_every_kind_of_problem(tmp_path, capsys):
    records = json.load(open(DATA))
    records[0]["image"] = "missing.png"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records[1]["image"] = str(tmp_path / "broken.png")
    records[2]["conversations"] = []
    records[3]["conversations"][1]["from"] = "human"
    records[6]["conversations"][0]["value"] = "<image>\nWhat is it?"  # text-only record with a placeholder
    records[4]["conversations"][1]["value"] = "word " * 3000
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    assert main(["data", "check", str(path), "--image-folder", IMAGES, "--image-tokens", "64", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 7 and report["with_image"] == 6 and report["text_only"] == 1
    assert report["problems"] == {"missing_image": 1, "unreadable_image": 1, "malformed_conversation": 2,
                                  "placeholder_without_image": 1, "too_long": 1}
    assert report["examples"]["missing_image"][0].startswith("scene0:")
    assert main(["data", "check", DATA, "--image-folder", IMAGES, "--image-tokens", "64"]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_data_check_counts_each_images_placeholders_as_the_model_does(tmp_path, capsys):
    """--model tiny-random-next: each image takes its stock AnyRes count (by its size), not one fixed count; a limit
    between the two counts flags the record on NeXT only."""
    from PIL import Image

    from ivtp.anyres import stock_tokens
    from ivtp.models import preset_config

    record = json.load(open(DATA))[0]
    with Image.open(os.path.join(IMAGES, record["image"])) as im:
        size = (im.height, im.width)
    next_count = stock_tokens(size, preset_config("tiny-random-next"))
    assert next_count > 576
    path = tmp_path / "one.json"
    path.write_text(json.dumps([record]))

    def too_long(model, limit):
        main(["data", "check", str(path), "--image-folder", IMAGES, "--model", model, "--model-max-length",
              str(limit), "--json"])
        return json.loads(capsys.readouterr().out)["problems"].get("too_long", 0)

    text = 0
    while too_long("tiny-random", 576 + text):  # the record's text tokens, less its one <image>
        text += 25
    assert not too_long("tiny-random", 576 + text) and too_long("tiny-random-next", 576 + text)
    assert not too_long("tiny-random-next", next_count + text)


def test_wandb_goes_offline_without_a_key(monkeypatch, tmp_path):
    from ivtp.training import parse_args

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    parse_args(["--output_dir", str(tmp_path), "--report_to", "wandb", "--use_cpu", "True"])
    assert os.environ["WANDB_MODE"] == "offline"
