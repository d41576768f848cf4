"""The aligner (eqs. 5-7): CLIP BPE offsets, the LLM-token mapping, and per-token relevance."""

import math

import open_clip
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ivtp.aligner import Aligner, clip_tokens_with_offsets, llm_token_spans, map_relevance
from ivtp.config import AlignerConfig, ConfigError
from ivtp.models import tiny_aligner, tiny_tokenizer

TEXT = "Is the reddish hexagon left?"


def llama_style_tokenizer():
    """SentencePiece-style pieces ("\u2581" marks a word start) that split words differently from CLIP."""
    pieces = ["\u2581Is", "\u2581the", "\u2581red", "dish", "\u2581hexagon", "\u2581left", "?"]
    chars = sorted(set("".join(pieces)) | {"\u2581"})
    vocab = [("<unk>", 0.0)] + [(p, -1.0) for p in pieces] + [(c, -10.0) for c in chars if c not in pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_clip_offsets_follow_open_clips_bpe():
    tok = open_clip.get_tokenizer("ViT-L-14-336")
    ids, spans = clip_tokens_with_offsets(tok, TEXT, 75)
    assert ids == tok.encode(TEXT)  # the same ids open_clip produces
    assert [TEXT[a:b] for a, b in spans] == ["Is", "the", "reddish", "hex", "agon", "left", "?"]
    ids, spans = clip_tokens_with_offsets(tok, "Zebras,  unbelievable!", 75)
    assert ids == tok.encode("Zebras,  unbelievable!")
    assert [("Zebras,  unbelievable!")[a:b] for a, b in spans] == ["Ze", "bras", ",", "unbelievable", "!"]
    assert len(clip_tokens_with_offsets(tok, TEXT, 3)[0]) == 3  # truncated to the context window


def test_llm_spans_and_eq7_mapping_by_hand():
    llm = llama_style_tokenizer()
    ids = llm(TEXT, add_special_tokens=False).input_ids
    text, spans = llm_token_spans(llm, ids)
    assert text == TEXT
    assert [text[a:b] for a, b in spans] == ["Is", " the", " red", "dish", " hexagon", " left", "?"]
    _, clip_spans = clip_tokens_with_offsets(open_clip.get_tokenizer("ViT-L-14-336"), TEXT, 75)
    clip_rel = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8])  # Is the reddish hex agon left ?
    got = map_relevance(spans, clip_spans, clip_rel)
    # " red" and "dish" lie inside CLIP's "reddish" (K = 0): its relevance. " hexagon" covers "hex" + "agon"
    # (K = 1): their mean. The leading space is not an overlap.
    assert got == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.5, 0.7, 0.8])
    assert math.isnan(map_relevance([(2, 3)], clip_spans, clip_rel)[0])  # only a space: no relevance


def _spans_by_whole_prefix(tokenizer, ids):
    """Reference for llm_token_spans: decode every whole prefix (quadratic in the length)."""
    tokens, spans, text = tokenizer.convert_ids_to_tokens(ids), [], ""
    for i in range(len(tokens)):
        longer = tokenizer.convert_tokens_to_string(tokens[: i + 1])
        assert longer.startswith(text)
        spans.append((len(text), len(longer)))
        text = longer
    return text, spans


@pytest.mark.parametrize("window", [1, 2, 16])
def test_llm_spans_from_a_window_equal_those_from_whole_prefixes(window):
    tok = tiny_tokenizer()
    text = ("Ünïcödé — “quoted” 🙂 日本語, double  spaces\nand a newline. " * 12
            + "Is there a red square at the top left of the image? " * 8)
    ids = tok(text, add_special_tokens=False).input_ids
    got = llm_token_spans(tok, ids, window=window)
    assert got == _spans_by_whole_prefix(tok, ids)
    assert got[0] == tok.decode(ids)


def test_eq7_mapping_equals_the_all_pairs_reference_on_a_long_text():
    """map_relevance sweeps both span lists once; the reference tests every (LLM token, CLIP token) pair."""
    text = ("Ünïcödé — “quoted” 🙂 日本語, double  spaces\nand a newline. Is there a red square? " * 6)
    llm = tiny_tokenizer()
    _, spans = llm_token_spans(llm, llm(text, add_special_tokens=False).input_ids)
    _, clip_spans = clip_tokens_with_offsets(open_clip.get_tokenizer("ViT-L-14-336"), text, 10_000)
    clip_rel = torch.rand(len(clip_spans), generator=torch.Generator().manual_seed(0))
    expected = []
    for a, b in spans:
        hits = [float(clip_rel[j]) for j, (c, d) in enumerate(clip_spans) if c < b and a < d]
        expected.append(sum(hits) / len(hits) if hits else math.nan)
    got = map_relevance(spans, clip_spans, clip_rel)
    assert got == pytest.approx(expected, nan_ok=True)
    assert any(math.isnan(x) for x in got) and sum(not math.isnan(x) for x in got) > 100  # both kinds occur


@pytest.mark.parametrize("model", ["ivtp-tiny-clip", "ivtp-cpu-mid-clip"])
def test_lean_text_blocks_equal_open_clips_own(model):
    """token_features runs open_clip's blocks through _lean_block; the reference is the blocks' own forward, with
    the causal mask both as SDPA's flag and as the explicit mask."""
    aligner = tiny_aligner(model=model)
    assert aligner._lean and aligner._triu_mask  # the fast path is the one under test
    ids = torch.randint(1, 5000, (3, 21), generator=torch.Generator().manual_seed(0))
    lean = aligner.token_features(ids)
    aligner._triu_mask = False  # the mask handed to SDPA as it is
    explicit = aligner.token_features(ids)
    aligner._lean = False  # open_clip's Transformer.forward
    reference = aligner.token_features(ids)
    torch.testing.assert_close(lean, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit, reference, rtol=1e-5, atol=1e-5)


def test_per_token_features_reproduce_open_clip_and_eq6():
    aligner = tiny_aligner()
    tok = aligner.tokenizer
    ids = tok([TEXT])  # (1, 77): <sot> ... <eot> 0 ...
    eot = int((ids[0] == tok.eot_token_id).nonzero()[0])
    feats = aligner.token_features(ids)  # (1, 77, E)
    # The pooled feature open_clip returns is the per-token feature at the end-of-text token.
    torch.testing.assert_close(feats[0, eot], aligner.text.encode_text(ids)[0], rtol=1e-5, atol=1e-6)
    cls = torch.randn(1, 32)
    spans, rel = aligner.clip_relevance([TEXT], cls)[0]
    image = torch.nn.functional.normalize(cls @ aligner.visual_proj, dim=-1)[0]
    expected = torch.nn.functional.normalize(feats[0, 1 : 1 + len(spans)], dim=-1) @ image
    torch.testing.assert_close(rel, expected, rtol=1e-5, atol=1e-6)


def test_a_causal_tower_gives_a_prefix_the_features_it_has_in_the_full_context():
    aligner = tiny_aligner()
    ids = aligner.tokenizer([TEXT, "a red circle"])  # (2, 77)
    n = int((ids[0] == aligner.tokenizer.eot_token_id).nonzero()[0]) + 1  # the longer text, <eot> included
    with torch.no_grad():
        torch.testing.assert_close(aligner.token_features(ids[:, :n]), aligner.token_features(ids)[:, :n],
                                   rtol=1e-5, atol=1e-6)
        aligner.text.attn_mask = None  # a bidirectional tower: its padding matters, so no prefix is accepted
        assert not aligner.causal
        with pytest.raises(ValueError, match="full context"):
            aligner.token_features(ids[:, :n])


def test_aligner_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="aligner checkpoint not found"):
        Aligner.from_config(AlignerConfig(model="ViT-B-32", pretrained=str(tmp_path / "missing.bin")))
    with pytest.raises(ConfigError, match="llm.aligner"):
        Aligner.from_config(AlignerConfig(model="no-such-clip", pretrained=None))
    with pytest.warns(UserWarning, match="RANDOM weights"):
        Aligner.from_config(AlignerConfig(model="ivtp-tiny-clip", pretrained=None))
