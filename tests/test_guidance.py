"""ivtp/guidance.py's extensions: the question-only instruction, centred and standardised relevance, and the
random-query control, by hand and through apply_pruning on the tiny model."""

import math

import pytest
import torch

from conftest import batch_of
from ivtp import ConfigError, PruneConfig, apply_pruning
from ivtp.aligner import llm_token_spans, map_relevance
from ivtp.config import TEMPLATE_PHRASES
from ivtp.guidance import blank_phrases, instruction_mask, prepare_clip, rate_clip, standardise
from ivtp.models import tiny_aligner


def test_blank_phrases_by_hand():
    text = "What is red?\nAnswer briefly. ASSISTANT:"
    spans = [(0, 4), (4, 7), (7, 11), (11, 12), (12, 13), (13, 19), (19, 27), (27, 28), (28, 39)]
    blanked, rated = blank_phrases(text, spans, ["Answer briefly.", "ASSISTANT:"])
    assert blanked == "What is red?\n" + " " * 15 + " " + " " * 10
    assert len(blanked) == len(text)  # offsets stay put
    # "\n" is whitespace only: nothing of it is rated; "Answer", " briefly", "." and the tag are inside phrases.
    assert rated == [True, True, True, True, False, False, False, False, False]
    # A token that straddles the question and a phrase ("red?\nAnswer" in one piece) stays rated.
    assert blank_phrases("red?\nAnswer this", [(0, 11), (11, 16)], ["Answer this"])[1] == [True, False]


def test_standardise_by_hand():
    nan = math.nan
    rows = torch.tensor([[0.1, 0.3, nan], [nan, nan, nan]])  # a row with two rated tokens and one without any
    assert standardise(rows, "cosine") is rows
    centred = standardise(rows, "centred")
    assert centred[0, :2].tolist() == pytest.approx([-0.1, 0.1]) and centred[0, 2].isnan() and centred[1].isnan().all()
    std = standardise(rows, "standardised")  # mean 0.2, population std 0.1
    assert std[0, :2].tolist() == pytest.approx([-1.0, 1.0]) and std[1].isnan().all()
    flat = standardise(torch.tensor([[0.4, nan]]), "standardised")
    assert flat[0, 0] == 0.0  # one rated token: no spread, never above a positive tau


def test_clip_relevance_on_the_device_is_eq7_by_hand(small_llava, images):
    """rate_clip's matrix form against eq. 7 read off the host: each rated LLM token's relevance is the mean of
    the cosines of the CLIP tokens it overlaps (map_relevance over Aligner.relevance), nan for the others. With a
    width (a compiled prefill's fixed shape) the padded CLIP tokens change nothing."""
    model, processor = small_llava()
    batch = batch_of(processor, images(2), ["What colour is the square?", "Is the red circle left of it?"])
    ids = batch["input_ids"]
    instr = instruction_mask(ids == model.config.image_token_id, batch["attention_mask"], None, None)
    aligner = tiny_aligner()
    cls = torch.randn(2, aligner.vision_width)
    for width in (None, aligner.context_length):
        prepared = prepare_clip(aligner, processor.tokenizer, ids, instr, width=width)
        assert prepared.clip_features.shape[1] == (width or prepared.clip_features.shape[1])
        got = rate_clip(aligner, prepared.clip_features, prepared.weights, cls)
        for b, (spans, cos) in enumerate(aligner.relevance(prepared.clip_spans, prepared.clip_features, cls)):
            want = map_relevance(prepared.spans[b], spans, cos)
            rated = [p for p, w in zip(prepared.positions[b], want) if not math.isnan(w)]
            assert rated and got[b, rated].tolist() == pytest.approx([w for w in want if not math.isnan(w)], abs=1e-6)
            assert got[b][[p for p in range(ids.shape[1]) if p not in rated]].isnan().all()


def test_question_scope_rates_only_the_question(small_llava, images):
    model, processor = small_llava()
    tok = processor.tokenizer
    batch = batch_of(processor, images(1), ["What colour is the square?\nAnswer the question using a single word "
                                            "or phrase."], padding_side="left")
    ids = batch["input_ids"]
    visual = ids == model.config.image_token_id
    instr = instruction_mask(visual, batch["attention_mask"], None, None)
    aligner = tiny_aligner()
    everything = prepare_clip(aligner, tok, ids, instr)
    question = prepare_clip(aligner, tok, ids, instr, TEMPLATE_PHRASES)
    assert everything.texts[0].endswith("ASSISTANT:") and "Answer the" in everything.texts[0]
    assert question.texts == everything.texts  # the text the report shows; CLIP reads it blanked:
    blanked = blank_phrases(everything.texts[0], everything.spans[0], TEMPLATE_PHRASES)[0]
    assert "Answer" not in blanked and "ASSISTANT" not in blanked and len(blanked) == len(everything.texts[0])
    assert torch.equal(question.clip_features, aligner.text_features([blanked])[1])
    rated_text = "".join(everything.texts[0][a:b] for a, b in question.spans[0])
    assert "square" in rated_text and "Answer" not in rated_text and "ASSISTANT" not in rated_text
    assert set(question.positions[0]) < set(everything.positions[0])
    # The positions kept are exactly the tokens whose text lies in the question.
    text, spans = llm_token_spans(tok, ids[0, everything.positions[0]].tolist())
    cut = text.index("\nAnswer")
    assert question.positions[0] == [p for p, (a, b) in zip(everything.positions[0], spans)
                                     if a < cut and text[a:min(b, cut)].strip()]


@pytest.mark.parametrize("llm, match", [
    ({"relevance": "zscore"}, "llm.relevance: expected one of"),
    ({"instruction": "user"}, "llm.instruction: expected one of"),
    ({"relevance": "centred", "guidance": "none"}, "need llm.guidance 'clip'"),
    ({"instruction": "question", "guidance": "all_text"}, "need llm.guidance 'clip'"),
    ({"tau": 1.5}, r"relevance 'cosine' a threshold in \[-1, 1\]"),
    ({"relevance": "standardised", "tau": 11.0}, r"\[-10, 10\]"),
    ({"template_phrases": ["ok", ""]}, "llm.template_phrases: a list of non-empty strings"),
])
def test_extension_keys_are_checked(llm, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig.from_dict({"method": "ivtp", "llm": llm})


def test_defaults_are_the_papers_form():
    llm = PruneConfig().llm
    assert (llm.relevance, llm.instruction, llm.guidance, llm.tau) == ("cosine", "all", "clip", 0.2)
    assert PruneConfig.from_dict({"llm": {"relevance": "standardised", "tau": 1.5}}).llm.tau == 1.5


def test_random_control_is_fixed_and_reaches_the_scores(small_llava, images):
    def kept(guidance):
        model, processor = small_llava()
        apply_pruning(model, {"vision": {"keep": 32}, "llm": {"keep": 8, "layers": 3, "group_size": 3,
                                                             "guidance": guidance}})
        batch = batch_of(processor, images(2), ["What is it?", "Where is the circle?"])
        with torch.no_grad():
            model(**batch)
        rows = model.ivtp_state.last_guidance
        assert [r.source for r in rows] == ["visual", "visual"] and all(not r.selected for r in rows)
        return model.ivtp_state.last_llm_trace.scores[0]

    torch.testing.assert_close(kept("random"), kept("random"), rtol=0, atol=0)  # seeded: the same control
    # It reaches the scorer: the scores move. (On this random model the kept sets still agree: the causal
    # ramp of the rollout that the extensions measure, docs/testbed.md.)
    assert not torch.allclose(kept("random"), kept("none"))
