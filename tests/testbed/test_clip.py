"""The testbed CLIP: exact export to HF CLIPVisionModel, the aligner file round trip, and a short training run."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionModel

from ivtp.aligner import Aligner
from ivtp.config import AlignerConfig, ConfigError
from ivtp.testbed.clip import (MODEL_NAME, build_clip, export_aligner, export_vision_tower, get_tokenizer,
                               normalize_images, text_state_dict, train_clip)

VOCAB = ["What colour is the circle?", "Is there a red square in the image?", "a blue triangle"]


@pytest.fixture(scope="module")
def clip():
    """The testbed CLIP with random weights, every parameter perturbed (so zero biases and unit gains cannot hide
    a wrong mapping)."""
    model = build_clip(seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_config_shapes(clip):
    v, t = clip.visual, clip
    assert v.image_size == (112, 112) and v.patch_size == (14, 14) and v.conv1.out_channels == 192
    assert len(v.transformer.resblocks) == 7 and v.transformer.resblocks[0].attn.num_heads == 4
    assert tuple(v.proj.shape) == (192, 128) and tuple(t.text_projection.shape) == (128, 128)
    assert tuple(t.positional_embedding.shape) == (32, 128) and len(t.transformer.resblocks) == 4
    assert get_tokenizer().context_length == 32


def test_vision_tower_export_is_exact(clip, tmp_path):
    out = export_vision_tower(clip, str(tmp_path / "vision"))
    tower = CLIPVisionModel.from_pretrained(out).eval()
    c = tower.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (192, 768, 7, 4)
    assert (c.image_size, c.patch_size, c.projection_dim, c.hidden_act, c.layer_norm_eps) == (
        112, 14, 128, "quick_gelu", 1e-5)
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        hf = tower(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(hf.pooler_output @ clip.visual.proj, clip.encode_image(x), rtol=0, atol=1e-5)
        h = clip.visual._embeds(x)  # patches + [CLS] + positions, ln_pre
        torch.testing.assert_close(hf.hidden_states[0], h, rtol=0, atol=1e-5)
        assert len(hf.hidden_states) == 8
        for i, block in enumerate(clip.visual.transformer.resblocks):
            h = block(h)
            torch.testing.assert_close(hf.hidden_states[i + 1], h, rtol=0, atol=1e-5)

    processor = CLIPImageProcessor.from_pretrained(out)
    pixels = (np.random.RandomState(0).rand(112, 112, 3) * 255).astype("uint8")
    got = processor(images=pixels, return_tensors="pt")["pixel_values"]
    expected = normalize_images(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # 112 px in: no resampling, same normalisation
    wide = processor(images=np.zeros((112, 150, 3), "uint8"), return_tensors="pt")["pixel_values"]
    assert tuple(wide.shape) == (1, 3, 112, 112)

    half = CLIPVisionModel.from_pretrained(export_vision_tower(clip, str(tmp_path / "half"), torch.float16))
    assert half.dtype == torch.float16


def test_aligner_round_trip(clip, tmp_path):
    path = str(tmp_path / "aligner.safetensors")
    info = export_aligner(clip, path, VOCAB)
    tok = get_tokenizer()
    vocab = sorted({tok.sot_token_id, tok.eot_token_id} | {i for t in VOCAB for i in tok.encode(t)})
    assert info["vocabulary"] == len(vocab) == 16  # 14 words and punctuation, <start>, <end>
    stored = load_file(path)
    assert stored["token_embedding.ids"].tolist() == vocab
    assert stored["token_embedding.rows"].dtype == torch.float16 and stored["token_embedding.rows"].shape == (16, 128)
    assert "token_embedding.weight" not in stored and "logit_scale" not in stored
    assert not [k for k in stored if k.startswith("visual.") and k != "visual.proj"]
    assert info["bytes"] < 2_000_000

    original = Aligner(copy.deepcopy(clip), clip.visual.proj, tok)  # (a copy: Aligner freezes what it holds)
    loaded = Aligner.from_config(AlignerConfig(model=MODEL_NAME, pretrained=path))
    assert loaded.context_length == 32 and loaded.vision_width == 192
    torch.testing.assert_close(loaded.visual_proj, clip.visual.proj.half().float(), rtol=0, atol=0)
    ids = tok(VOCAB[:2])  # in the vocabulary; compared up to <end> (the padding id 0, "!", is not in it)
    real = torch.arange(32) <= (ids == tok.eot_token_id).int().argmax(1, keepdim=True)  # (2, 32)
    assert real.sum(1).tolist() == [8, 11]
    with torch.no_grad():
        want, got = original.token_features(ids)[real], loaded.token_features(ids)[real]
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # fp16 storage
    assert (got - want).abs().max() < 0.05 * want.abs().max()

    table = loaded.text.token_embedding.weight
    oov = tok.encode("zebra")
    assert oov and not set(oov) & set(vocab)
    assert torch.equal(table[oov], torch.zeros(len(oov), 128))  # outside the vocabulary: zeros
    assert int((table.abs().sum(1) > 0).sum()) == 16
    torch.testing.assert_close(table[vocab], clip.token_embedding.weight[vocab].half().float(), rtol=0, atol=0)


def test_aligner_checkpoint_errors(clip, tmp_path):
    full = {k: v.contiguous() for k, v in clip.state_dict().items()}
    vision_only = {k: v for k, v in full.items() if k.startswith("visual.")}
    save_file(vision_only, str(tmp_path / "vision.safetensors"))
    missing = (r"lacks the aligner weights .* missing positional_embedding, text_projection, "
               r"transformer\.\* \(48 tensors\), token_embedding\.weight, ln_final\.weight, ln_final\.bias$")
    with pytest.raises(ConfigError, match=missing):  # a vision-only checkpoint (visual.proj is there)
        Aligner.from_config(AlignerConfig(model=MODEL_NAME, pretrained=str(tmp_path / "vision.safetensors")))
    no_proj = text_state_dict(clip)
    del no_proj["visual.proj"], no_proj["ln_final.bias"]
    torch.save(no_proj, tmp_path / "no_proj.pt")
    with pytest.raises(ConfigError, match=r"missing ln_final\.bias, visual\.proj$"):
        Aligner.from_config(AlignerConfig(model=MODEL_NAME, pretrained=str(tmp_path / "no_proj.pt")))
    # A whole open_clip checkpoint (open_clip's training format, DDP prefix) loads: vision keys are ignored.
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in full.items()}}, tmp_path / "full.pt")
    aligner = Aligner.from_config(AlignerConfig(model=MODEL_NAME, pretrained=str(tmp_path / "full.pt")))
    assert torch.equal(aligner.text.token_embedding.weight, clip.token_embedding.weight)
    with pytest.raises(ConfigError, match="does not match ivtp-tiny-clip"):  # another architecture
        Aligner.from_config(AlignerConfig(model="ivtp-tiny-clip", pretrained=str(tmp_path / "full.pt")))


def test_a_few_training_steps_lower_the_loss(tmp_path):
    from open_clip.loss import ClipLoss

    from ivtp.data.shapes import write_clip_captions
    from ivtp.testbed.clip import load_images, read_tsv

    tsv = write_clip_captions(str(tmp_path / "clip.tsv"), 32, seed=0, image_dir=str(tmp_path / "images"),
                              write_image_files=True)
    rows = read_tsv(tsv)[:24]  # train_clip holds out the last 8 (a quarter)
    images = normalize_images(load_images([p for p, _ in rows], 112))
    texts = get_tokenizer()([c for _, c in rows])

    def loss(model):
        with torch.no_grad():
            return float(ClipLoss()(*model.eval()(images, texts)))

    before = loss(build_clip(seed=0))
    model, metrics = train_clip(tsv, str(tmp_path / "out"), steps=8, batch_size=24, lr=1e-3, seed=0, threads=1,
                                progress=False)
    after = loss(model)
    assert before == pytest.approx(3.595, abs=2e-3)  # seeded init (chance level is log 24 = 3.18)
    assert after == pytest.approx(3.222, abs=0.05)  # after 8 steps on these 24 images
    assert after < before - 0.3
    assert (metrics["n_train"], metrics["n_eval"], metrics["steps"], metrics["batch_size"]) == (24, 8, 8, 24)
    for key in ("i2t_top1", "t2i_top1", "relevance_auc_colour", "relevance_auc_shape"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_region_head_classifies_the_mean_of_each_objects_patches():
    from ivtp.testbed.clip import _RegionHead

    model = build_clip(seed=0)
    regions = [[(0, [0, 1]), (2, [5])], [(1, [3, 4, 6])]]
    region = _RegionHead(model, regions)
    assert region.head.out_features == 3  # classes 0..2
    h = torch.randn(2, 1 + 8, region.head.in_features)  # (B, 1 + P, W) as the hooked block returns it
    region._out = h
    got = region.loss(torch.tensor([1, 0]))  # batch row 0 is image 1, row 1 is image 0
    pooled = torch.stack([h[0, 1 + torch.tensor([3, 4, 6])].mean(0), h[1, 1 + torch.tensor([0, 1])].mean(0),
                          h[1, 1 + 5]])
    want = torch.nn.functional.cross_entropy(region.head(pooled), torch.tensor([1, 0, 2]))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    region.remove()
    assert not model.visual.transformer.resblocks[-2]._forward_hooks


def test_region_head_sums_the_cross_entropy_of_each_label_set():
    from ivtp.testbed.clip import _RegionHead

    model = build_clip(seed=0)
    regions = [[((0, 4), [0, 1]), ((2, 1), [5])], [((1, 8), [3, 4, 6])]]  # (shape, position) per object
    region = _RegionHead(model, regions)
    assert region.classes == [3, 9] and region.head.out_features == 12
    h = torch.randn(1, 1 + 8, region.head.in_features)
    region._out = h
    got = region.loss(torch.tensor([0]), weights=(3.0, 0.5))
    logits = region.head(torch.stack([h[0, 1 + torch.tensor([0, 1])].mean(0), h[0, 1 + 5]]))  # (2, 12)
    ce = torch.nn.functional.cross_entropy
    want = 3.0 * ce(logits[:, :3], torch.tensor([0, 2])) + 0.5 * ce(logits[:, 3:], torch.tensor([4, 1]))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert len(region.accuracy[-1]) == 2
    region.remove()
    with pytest.raises(ValueError, match="same number of labels"):
        _RegionHead(model, [[((0, 1), [0])], [(2, [1])]])


def test_region_loss_trains_and_checks_its_labels(tmp_path):
    from ivtp.data.shapes import POSITIONS, object_regions, write_clip_captions

    tsv = write_clip_captions(str(tmp_path / "clip.tsv"), 32, seed=0, image_dir=str(tmp_path / "images"),
                              write_image_files=True)
    regions = object_regions(0, 32, labels=("shape", "position"))
    assert len(regions) == 32 and all(0 <= s < 3 and 0 <= q < len(POSITIONS) and p
                                      for objs in regions for (s, q), p in objs)
    plain, _ = train_clip(tsv, str(tmp_path / "a"), steps=3, batch_size=24, seed=0, threads=1, progress=False)
    aux, metrics = train_clip(tsv, str(tmp_path / "b"), steps=3, batch_size=24, seed=0, threads=1, progress=False,
                              regions=regions, region_weight=(3.0, 1.0))
    assert metrics["region_weight"] == [3.0, 1.0] and len(metrics["region_train_acc_last50"]) == 2
    assert all(0.0 <= a <= 1.0 for a in metrics["region_train_acc_last50"])
    first = "visual.transformer.resblocks.0.mlp.c_fc.weight"  # the aux loss reaches the tower below layer -2
    assert not torch.equal(plain.state_dict()[first], aux.state_dict()[first])
    assert not any(k.startswith("head") for k in aux.state_dict())  # the head is not part of the CLIP
    with pytest.raises(ValueError, match="regions for each of the 32 rows"):
        train_clip(tsv, str(tmp_path / "c"), steps=1, batch_size=24, threads=1, progress=False,
                   regions=regions[:5], region_weight=1.0)
    with pytest.raises(ValueError, match="1 weights for 2 label sets"):
        train_clip(tsv, str(tmp_path / "d"), steps=1, batch_size=24, threads=1, progress=False,
                   regions=regions, region_weight=(1.0,))


def test_aligner_tuning_trains_the_text_side_only_and_exports(clip, tmp_path):
    """Locked-image tuning: a few steps move the text tower, the caption words' embedding rows and visual.proj,
    leave every other embedding row as it was, and the tuned aligner exports and loads like the contrastive one."""
    from ivtp.data.shapes import scene_for, web_caption_words
    from ivtp.testbed.clip import aligner_metrics, train_aligner, vocabulary_ids

    path = str(tmp_path / "a.safetensors")
    export_aligner(clip, path, ["What colour is the square?", *web_caption_words()])
    aligner = Aligner.from_config(AlignerConfig(model=MODEL_NAME, pretrained=path))
    before = copy.deepcopy(aligner.state_dict())
    scenes = [scene_for(0, "train", i) for i in range(24)]
    cls = torch.randn(len(scenes), aligner.vision_width)
    metrics = train_aligner(aligner, cls, scenes, steps=3, batch_size=8, lr=1e-3, eval_images=8, progress=False)
    after = aligner.state_dict()
    assert np.isfinite(metrics["loss_last50"]) and 0 <= metrics["relevance_auc_shape_question"] <= 1
    assert set(aligner_metrics(aligner, cls[:4], scenes[:4])) == set(k for k in metrics if k.startswith("relevance"))
    assert not torch.equal(before["visual_proj"], after["visual_proj"])
    assert not torch.equal(before["text.ln_final.weight"], after["text.ln_final.weight"])
    used = vocabulary_ids([*web_caption_words(), ","], aligner.tokenizer)
    emb_b, emb_a = before["text.token_embedding.weight"], after["text.token_embedding.weight"]
    assert not torch.equal(emb_b[used], emb_a[used])
    other = torch.ones(emb_b.shape[0], dtype=torch.bool)
    other[used] = False
    assert torch.equal(emb_b[other], emb_a[other])
    assert not any(p.requires_grad for p in aligner.parameters())
    out = str(tmp_path / "tuned.safetensors")
    export_aligner(aligner, out, ["What colour is the square?", *web_caption_words()])
    loaded = Aligner.from_config(AlignerConfig(model=MODEL_NAME, pretrained=out))
    ids = aligner.tokenizer(["a red circle on the left"])
    torch.testing.assert_close(loaded.token_features(ids), aligner.token_features(ids), rtol=2e-2, atol=2e-2)
