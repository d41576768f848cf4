"""Presets, loading from folders, and the original-LLaVA converter."""

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from ivtp.convert import convert_original_llava
from ivtp.models import (PRESETS, ModelNotFoundError, llava_config, load_model, preset_config, preset_processor,
                         tiny_random, tiny_tokenizer)


def n_params(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LlavaForConditionalGeneration(config).parameters())


@pytest.mark.parametrize("name, billions", [("llava-1.5-7b", 7.06), ("llava-1.5-13b", 13.35)])
def test_random_weight_presets_have_the_llava15_architecture(name, billions):
    preset = PRESETS[name]
    config = llava_config(preset.vision, preset.text)
    assert config.text_config.vocab_size == 32064 and config.vision_config.num_hidden_layers == 24
    assert config.vision_config.image_size // config.vision_config.patch_size == 24
    assert n_params(config) / 1e9 == pytest.approx(billions, abs=0.02)


@pytest.mark.parametrize("name, billions", [("llava-1.6-7b", 7.06), ("llava-1.6-13b", 13.35)])
def test_random_weight_next_presets_have_the_llava16_architecture(name, billions):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = preset_config(name)
    assert isinstance(config, LlavaNextConfig) and config.text_config.vocab_size == 32064
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    with torch.device("meta"):
        params = sum(p.numel() for p in LlavaNextForConditionalGeneration(config).parameters())
    assert params / 1e9 == pytest.approx(billions, abs=0.02)


def test_next_preset_processor_writes_the_stock_anyres_count():
    from ivtp.anyres import stock_tokens

    config = preset_config("cpu-mid-next")
    processor = preset_processor(tiny_tokenizer(), config)
    for height, width in [(672, 672), (400, 1000), (300, 200)]:
        image = torch.zeros(3, height, width, dtype=torch.uint8)
        enc = processor(images=[image], text=["<image>\nHi"], return_tensors="pt")
        placeholders = int((enc["input_ids"] == config.image_token_id).sum())
        assert placeholders == stock_tokens((height, width), config), (height, width)
        assert enc["image_sizes"].tolist() == [[height, width]]


def test_tiny_random_is_deterministic_and_has_llava15_token_geometry():
    a, processor = tiny_random()
    b, _ = tiny_random()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    enc = processor(images=[torch.zeros(3, 40, 60, dtype=torch.uint8)], text=["<image>\nHi"], return_tensors="pt")
    assert int((enc["input_ids"] == a.config.image_token_id).sum()) == 576


def test_load_model_from_a_llava_hf_folder(tmp_path):
    model, processor = tiny_random(image_size=112)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_proc = load_model(str(tmp_path))
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded_proc.tokenizer.image_token_id == processor.tokenizer.image_token_id


def test_load_model_rejects_folders_that_are_not_llava_hf(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "mm_projector_type": "mlp2x_gelu"}))
    with pytest.raises(ValueError, match="ivtp convert"):
        load_model(str(tmp_path))


def _original_tokenizer(path):
    """A Llama-style tokenizer without <image> or <pad>, as the original checkpoints ship."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(97)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(path)


def _original_checkpoint(tmp_path, extra_weights: dict | None = None, extra_config: dict | None = None):
    """A tiny checkpoint in liuhaotian's layout under tmp_path/orig (its CLIP tower in tmp_path/clip), with
    `extra_weights` and `extra_config` added: (clip, llama, projector weights, source folder)."""
    torch.manual_seed(0)
    clip_dir, src = tmp_path / "clip", tmp_path / "orig"
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, image_size=56, patch_size=14)).eval()
    clip.save_pretrained(clip_dir)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=100)).eval()
    proj = {"model.mm_projector.0.weight": torch.randn(64, 32), "model.mm_projector.0.bias": torch.randn(64),
            "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64),
            **(extra_weights or {})}
    src.mkdir()
    torch.save({**llama.state_dict(), **proj}, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_vision_tower": str(clip_dir), **(extra_config or {})}))
    _original_tokenizer(src)
    return clip, llama, proj, src


def _projected(clip, proj: dict, pixels):
    """Layer -2 patch features through mm_projector.0 -> GELU -> mm_projector.2, by hand."""
    feats = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    hidden = torch.nn.functional.gelu(feats @ proj["model.mm_projector.0.weight"].T + proj["model.mm_projector.0.bias"])
    return hidden @ proj["model.mm_projector.2.weight"].T + proj["model.mm_projector.2.bias"]


def test_converter_from_the_original_layout(tmp_path):
    """Write a tiny checkpoint in liuhaotian's layout, convert it, and compare against its parts."""
    clip, llama, proj, src = _original_checkpoint(tmp_path)
    out = tmp_path / "hf"
    convert_original_llava(str(src), str(out))
    model, processor = load_model(str(out), dtype=torch.float32)
    assert model.config.text_config.vocab_size == 128  # 100 + <image> + <pad>, padded to a multiple of 64
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == 100

    ids = torch.tensor([[1, 5, 17, 42, 99]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        # Text: the converted LLM is the original Llama (on the original vocabulary).
        torch.testing.assert_close(model(input_ids=ids).logits[..., :100], llama(input_ids=ids).logits)
        # Image: layer -2 patch features through mm_projector.0 -> GELU -> mm_projector.2.
        ref = _projected(clip, proj, pixels)
        got = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    torch.testing.assert_close(got, ref[0], rtol=1e-5, atol=1e-5)
    # New vocabulary rows start at the mean embedding.
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[100:], emb[:100].mean(0, keepdim=True).expand(28, -1))


def test_converter_from_the_original_llava_16_layout(tmp_path):
    """liuhaotian's LLaVA-1.6 layout (anyres, spatial_unpad, model.image_newline) becomes a llava-hf LLaVA-NeXT:
    the image's packed features are the projected crops, the tiles' map in raster order with the original
    image_newline after each row, computed here by hand for a 112 x 112 image (the 2 x 2 grid, nothing cut)."""
    from transformers import LlavaNextForConditionalGeneration

    grids = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    clip, llama, proj, src = _original_checkpoint(
        tmp_path, {"model.image_newline": torch.randn(64)},
        {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": grids})
    out = tmp_path / "hf"
    convert_original_llava(str(src), str(out))
    model, processor = load_model(str(out), dtype=torch.float32)
    assert isinstance(model, LlavaNextForConditionalGeneration) and model.config.image_grid_pinpoints == grids
    ids = torch.tensor([[1, 5, 17, 42, 99]])
    pixels = torch.randn(1, 5, 3, 56, 56)  # base view and the 2 x 2 tiles
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., :100], llama(input_ids=ids).logits)
        crops = _projected(clip, proj, pixels[0])  # (5, 16, 64)
        got = model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[112, 112]]))
    expected = [crops[0, p] for p in range(16)]
    for r in range(8):  # the map's rows: tile (r // 4, c // 4), its patch (r % 4, c % 4)
        expected += [crops[1 + (r // 4) * 2 + c // 4, (r % 4) * 4 + c % 4] for c in range(8)]
        expected.append(proj["model.image_newline"])
    torch.testing.assert_close(got.pooler_output[0], torch.stack(expected), rtol=1e-5, atol=1e-5)
    enc = processor(images=[Image.new("RGB", (112, 112))], text=["<image>"], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 16 + 8 * 9


def test_converter_refuses_what_llava_hf_next_cannot_run(tmp_path):
    from ivtp.convert import _is_anyres

    base = {"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[336, 672]]}
    assert _is_anyres({**base, "mm_patch_merge_type": "spatial_unpad"})
    assert not _is_anyres({"image_aspect_ratio": "pad"})
    with pytest.raises(ValueError, match="spatial_unpad only"):
        _is_anyres({**base, "mm_patch_merge_type": "spatial"})
    with pytest.raises(ValueError, match="only Llama-architecture"):
        _is_anyres({**base, "mm_patch_merge_type": "spatial_unpad", "architectures": ["LlavaMistralForCausalLM"]})


def test_converter_rejects_a_checkpoint_without_projector(tmp_path):
    src = tmp_path / "orig"
    src.mkdir()
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100))
    torch.save(llama.state_dict(), src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
                                                 "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="aligner is missing"):
        convert_original_llava(str(src), str(tmp_path / "out"))


def test_load_model_by_hub_id_from_the_hf_cache(tmp_path, monkeypatch):
    """A hub id resolves from the cache layout (models--org--name/snapshots/<rev>) with no network."""
    model, processor = tiny_random(image_size=112)
    snapshot = tmp_path / "models--someone--tiny-llava" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    (tmp_path / "models--someone--tiny-llava" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-llava" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, _ = load_model("someone/tiny-llava", cache_dir=str(tmp_path))
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ModelNotFoundError, match="neither a preset"):
        load_model("someone/not-cached", cache_dir=str(tmp_path))
