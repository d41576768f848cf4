"""LLaVA-1.5 conversation templates and label masking.

Two templates, as LLaVA-1.5 trains them:
- `plain` (pretraining, 558K captions): "<image>" + caption + "\\n". Only the caption and the newline are
  supervised; the human turn's text beyond the image is not used.
- `vicuna_v1` (instruction tuning, 665K mix): "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:
  {a2}</s>...". Every assistant answer and the "</s>" that closes it are supervised; the system prompt, the
  user turns and the "ASSISTANT:" tags are not, nor is <s>.

Masking is done on characters, then mapped to tokens through the fast tokenizer's offsets: a token is supervised
when it overlaps a supervised character. That is what LLaVA's round-length arithmetic computes for the Llama
tokenizer, without its tokenizer-version special cases.
"""

from __future__ import annotations

from dataclasses import dataclass

from ivtp.errors import InputError

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES = ("plain", "vicuna_v1")
HUMAN, GPT = "human", "gpt"


class ConversationError(InputError):
    """A conversation that a template cannot render."""


def vicuna_v1_prompt(question: str, has_image: bool = True) -> str:
    """One-turn vicuna_v1 prompt, as LLaVA-1.5's evaluation builds it: the image first, then the question."""
    if IMAGE_PLACEHOLDER in question:
        raise ConversationError("the question already contains <image>; pass the bare question (the template "
                                "places the image)")
    user = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question
    return f"{VICUNA_V1_SYSTEM} USER: {user} ASSISTANT:"


@dataclass
class Rendered:
    text: str
    supervised: list[tuple[int, int]]  # character spans whose tokens are labels


def check_turns(conversations: list[dict], sample_id: str = "?") -> None:
    """Turns alternate human, gpt, human, gpt... and are non-empty."""
    if not conversations:
        raise ConversationError(f"sample {sample_id}: empty conversation")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"sample {sample_id}: turn {i} is not a {{'from', 'value'}} mapping")
        expected = HUMAN if i % 2 == 0 else GPT
        if turn["from"] != expected:
            raise ConversationError(
                f"sample {sample_id}: turn {i} is from {turn['from']!r}, expected {expected!r} (turns must "
                "alternate human, gpt, starting with human)"
            )
    if len(conversations) % 2:
        raise ConversationError(f"sample {sample_id}: the last turn is a human turn with no answer")


def placeholder_problem(conversations: list[dict], has_image: bool) -> tuple[str, str] | None:
    """(kind, detail) when a sample's <image> placeholders do not fit its image, else None. LLaVA-1.5 reads one
    image per sample, at the start of the human turn that holds the placeholder (or of the first, when none
    does): a placeholder in an answer, a second one, or one without an image file would reach the model as
    576 more placeholder tokens than there are image features."""
    turns = [t for t in conversations if isinstance(t, dict)]
    counts = [str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in turns]
    if not any(counts):
        return None
    if not has_image:
        return "placeholder_without_image", "<image> in the text but no image file"
    answers = [i for i, (t, n) in enumerate(zip(turns, counts)) if n and t.get("from") == GPT]
    if answers:
        return "placeholder_in_answer", f"<image> in the gpt answer of turn {answers[0]}"
    if sum(counts) > 1:
        where = ", ".join(f"turn {i}" for i, n in enumerate(counts) if n)
        return "extra_placeholder", f"{sum(counts)} <image> placeholders ({where}) for one image"
    return None


def place_image(conversations: list[dict], has_image: bool) -> list[dict]:
    """The turns with the image placed: a few records with an image leave the placeholder out, and LLaVA then puts
    the image before the first question. Other records come back as they are."""
    if has_image and conversations and not any(IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in conversations
                                               if isinstance(t, dict)):
        first = conversations[0]
        if isinstance(first, dict):
            return [dict(first, value=IMAGE_PLACEHOLDER + "\n" + str(first.get("value", "")))] + list(conversations[1:])
    return conversations


def render(template: str, conversations: list[dict], eos: str, sample_id: str = "?") -> Rendered:
    """The training text of one sample, and which characters are supervised."""
    check_turns(conversations, sample_id)
    if template == "plain":
        # A text-only record (LLaVA's pretraining set has none, but a mixed file may) trains on its caption with no
        # image placeholder; writing one would ask for an image the batch does not hold.
        caption = conversations[1]["value"]
        text = IMAGE_PLACEHOLDER if any(IMAGE_PLACEHOLDER in t["value"] for t in conversations) else ""
        start = len(text)
        text += caption + "\n"
        return Rendered(text, [(start, len(text))])
    if template != "vicuna_v1":
        raise ValueError(f"unknown template {template!r}; templates: {', '.join(TEMPLATES)}")
    text = VICUNA_V1_SYSTEM + " "
    supervised = []
    for i in range(0, len(conversations), 2):
        question = _image_first(conversations[i]["value"])
        text += f"USER: {question} ASSISTANT:"
        answer = " " + conversations[i + 1]["value"] + eos
        supervised.append((len(text) + 1, len(text) + len(answer)))  # the answer and its eos, not the space
        text += answer
    return Rendered(text, supervised)


def _image_first(value: str) -> str:
    """LLaVA-1.5 moves the image placeholder to the start of its turn, followed by a newline."""
    if IMAGE_PLACEHOLDER not in value:
        return value
    rest = value.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{rest}"


def tokenize(rendered: Rendered, tokenizer, image_tokens: int) -> tuple[list[int], list[int]]:
    """input_ids and labels for a rendered sample, with <s> first and each <image> expanded to `image_tokens`
    placeholders (one per visual token, as the llava-hf processor writes them)."""
    text = rendered.text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * image_tokens)
    shift = []  # where each original <image> grew: keep character spans aligned
    grown = len(IMAGE_PLACEHOLDER) * (image_tokens - 1)
    pos = rendered.text.find(IMAGE_PLACEHOLDER)
    while pos != -1:
        shift.append(pos)
        pos = rendered.text.find(IMAGE_PLACEHOLDER, pos + 1)

    def moved(c: int) -> int:
        return c + grown * sum(1 for p in shift if p < c)

    spans = [(moved(a), moved(b)) for a, b in rendered.supervised]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tokenizer.bos_token_id] + enc["input_ids"]
    labels = [IGNORE_INDEX]
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        hit = b > a and any(a < e and s < b for s, e in spans)
        labels.append(tid if hit else IGNORE_INDEX)
    return ids, labels
