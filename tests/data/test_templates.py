"""LLaVA-1.5 label masking for the plain and vicuna_v1 templates, token by token."""

import pytest

from ivtp.data.templates import IGNORE_INDEX, ConversationError, place_image, render, tokenize
from ivtp.models import tiny_tokenizer

CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red"},
        {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "Yes"}]


def marked(tokenizer, ids, labels):
    """(token, supervised) pairs; a supervised label must be the token itself."""
    assert all(lab in (IGNORE_INDEX, tid) for tid, lab in zip(ids, labels))
    return [(t, lab != IGNORE_INDEX) for t, lab in zip(tokenizer.convert_ids_to_tokens(ids), labels)]


def test_vicuna_v1_supervises_each_answer_and_its_eos_only():
    tok = tiny_tokenizer()
    rendered = render("vicuna_v1", CONV, tok.eos_token)
    assert rendered.text.endswith(" USER: <image>\nWhat colour? ASSISTANT: Red</s>USER: Is it big? ASSISTANT: Yes</s>")
    assert rendered.text.startswith("A chat between a curious human and an artificial intelligence assistant.")
    ids, labels = tokenize(rendered, tok, image_tokens=3)
    pairs = marked(tok, ids, labels)
    assert pairs[0] == ("<s>", False)
    assert [t for t, _ in pairs].count("<image>") == 3  # the image expanded to its placeholders, unsupervised
    tail = pairs[-26:]  # from the first answer on, by hand:
    assert tail == [
        ("\u2581R", True), ("ed", True), ("</s>", True),
        ("\u2581", False), ("U", False), ("S", False), ("E", False), ("R", False), (":", False),
        ("\u2581Is", False), ("\u2581it", False), ("\u2581big", False), ("?", False),
        ("\u2581A", False), ("S", False), ("S", False), ("I", False), ("S", False), ("T", False), ("A", False),
        ("N", False), ("T", False), (":", False),
        ("\u2581Y", True), ("es", True), ("</s>", True),
    ]
    supervised = [t for t, s in pairs if s]
    assert supervised == ["\u2581R", "ed", "</s>", "\u2581Y", "es", "</s>"]
    first = next(i for i, (_, s) in enumerate(pairs) if s)
    assert [t for t, _ in pairs[first - 10 : first]] == ["\u2581A", "S", "S", "I", "S", "T", "A", "N", "T", ":"]
    assert pairs[first + 3 : first + 9] == [("\u2581", False), ("U", False), ("S", False), ("E", False),
                                            ("R", False), (":", False)]


def test_plain_supervises_the_caption_and_newline():
    tok = tiny_tokenizer()
    rendered = render("plain", [{"from": "human", "value": "<image>\nDescribe."},
                                {"from": "gpt", "value": "a red circle"}], tok.eos_token)
    assert rendered.text == "<image>a red circle\n"  # LLaVA's plain ignores the human text
    ids, labels = tokenize(rendered, tok, image_tokens=2)
    assert marked(tok, ids, labels) == [("<s>", False), ("<image>", False), ("<image>", False),
                                        ("\u2581a", True), ("\u2581red", True), ("\u2581circle", True), ("\n", True)]


def test_plain_writes_no_image_for_a_text_only_record():
    tok = tiny_tokenizer()
    rendered = render("plain", [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "a red circle"}],
                      tok.eos_token)
    assert rendered.text == "a red circle\n"
    ids, labels = tokenize(rendered, tok, image_tokens=2)
    assert marked(tok, ids, labels) == [("<s>", False), ("\u2581a", True), ("\u2581red", True),
                                        ("\u2581circle", True), ("\n", True)]


def test_an_image_without_placeholder_goes_before_the_first_question():
    conv = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Red"}]
    assert place_image(conv, has_image=True)[0]["value"] == "<image>\nWhat colour?"
    assert place_image(conv, has_image=False) is conv
    assert place_image(CONV, has_image=True) is CONV  # already placed


@pytest.mark.parametrize("conv, match", [
    ([], "empty conversation"),
    ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], "turn 0 is from 'gpt'"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "turn 1 is from 'human'"),
    ([{"from": "human", "value": "a"}], "no answer"),
    ([{"from": "human"}], "not a"),
])
def test_malformed_conversations_name_the_sample(conv, match):
    with pytest.raises(ConversationError, match=f"sample s7: .*{match}"):
        render("vicuna_v1", conv, "</s>", "s7")
