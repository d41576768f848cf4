"""Which instruction tokens form the pseudo-CLS (IVTP eq. 8 and the Table 6 variants).

The instruction of a row is its text after its last image: LLaVA-1.5 puts the image first in the user turn.
Tokens the model is trained to produce (labels != -100) and everything after the first of them are not
instruction, nor is anything past `prompt_len` (what generate appended), nor padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ivtp.aligner import Aligner, Span, TokenRelevance, llm_token_spans, map_relevance


@dataclass
class RowGuidance:
    """What the report shows for one row."""

    source: str  # "text" (selected instruction tokens) or "visual" (the projected visual [CLS])
    selected: list[TokenRelevance] = field(default_factory=list)
    instruction: list[TokenRelevance] = field(default_factory=list)  # every instruction token, rated

    def to_json(self) -> dict:
        def tok(t):
            return {"token": t.text, "position": t.position,
                    "relevance": None if math.isnan(t.relevance) else round(t.relevance, 4)}

        return {"pseudo_cls_source": self.source, "selected_tokens": [tok(t) for t in self.selected],
                "instruction_tokens": [tok(t) for t in self.instruction]}


def instruction_mask(visual: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                     prompt_len: int | None) -> torch.Tensor:
    """(B, L) bool: the instruction tokens of each row (see the module docstring). Rows without images: none."""
    b, length = visual.shape
    idx = torch.arange(length, device=visual.device)[None].expand(b, -1)
    last_visual = torch.where(visual, idx, -1).max(dim=1).values  # (B,) -1 if no image
    mask = (idx > last_visual[:, None]) & (last_visual[:, None] >= 0)
    if attention_mask is not None:
        mask &= attention_mask.bool()
    if labels is not None:
        supervised = labels != -100
        first = torch.where(supervised, idx, length).min(dim=1).values  # (B,)
        mask &= idx < first[:, None]
    if prompt_len is not None:
        mask &= idx < prompt_len
    return mask


@dataclass
class InstructionText:
    """The image-independent half of eqs. 5-7 for a batch: each row's instruction tokens as text and their CLIP
    token features (`prepare_clip`). `rate_prepared` finishes the job once the image's [CLS] is known."""

    positions: list[list[int]]  # per row: positions of its instruction tokens in the LLM input
    texts: list[str]  # per row: the text they decode to (CLIP reads it with any template phrases blanked)
    spans: list[list[Span]]  # per row: each LLM token's character span in that text
    clip_spans: list[list[Span]]  # per row: each CLIP token's character span
    clip_features: torch.Tensor  # (B, C, E) unit CLIP features of every token, start token first


def prepare_clip(aligner: Aligner, tokenizer, input_ids: torch.Tensor, instr: torch.Tensor,
                 template_phrases=()) -> InstructionText:
    """Decode each row's instruction tokens to text and run CLIP's text tower on them. instr: (B, L) bool.

    `template_phrases` (llm.instruction 'question'): every occurrence of them in the text is blanked before CLIP
    reads it (spaces: character offsets stay put), and tokens with no other character are not rated."""
    instr, ids = instr.cpu(), input_ids.cpu()  # the text work is on the host: copy once, not once per row
    positions = [torch.nonzero(instr[b]).flatten().tolist() for b in range(instr.shape[0])]
    texts, clip_texts, spans = [], [], []
    for b, pos in enumerate(positions):
        text, sp = llm_token_spans(tokenizer, ids[b, pos].tolist()) if pos else ("", [])
        clip_text = text
        if template_phrases and pos:
            clip_text, rated = blank_phrases(text, sp, template_phrases)
            positions[b] = [p for p, r in zip(pos, rated) if r]
            sp = [s for s, r in zip(sp, rated) if r]
        texts.append(text)
        clip_texts.append(clip_text)
        spans.append(sp)
    clip_spans, features = aligner.text_features(clip_texts)
    return InstructionText(positions, texts, spans, clip_spans, features)


def blank_phrases(text: str, spans: list[Span], phrases) -> tuple[str, list[bool]]:
    """`text` with every occurrence of each phrase replaced by spaces, and for each token span whether any
    non-space character of it is left (a token inside a phrase is then not rated)."""
    hidden = bytearray(len(text))  # 1 where a phrase covers the character
    for phrase in phrases:
        start = text.find(phrase)
        while start >= 0:
            hidden[start : start + len(phrase)] = b"\x01" * len(phrase)
            start = text.find(phrase, start + len(phrase))
    blanked = "".join(" " if h else c for c, h in zip(text, hidden))
    return blanked, [any(not hidden[i] and not text[i].isspace() for i in range(a, b)) for a, b in spans]


def standardise(rated: list[list[TokenRelevance]], mode: str) -> list[list[TokenRelevance]]:
    """Relevance as llm.relevance reads it: 'cosine' as rated (the paper); 'centred' minus the row's mean over
    its rated tokens; 'standardised' centred and divided by the row's standard deviation (a row with one rated
    token, or all equal, gets 0)."""
    if mode == "cosine":
        return rated
    out = []
    for toks in rated:
        vals = [t.relevance for t in toks if not math.isnan(t.relevance)]
        mean = sum(vals) / len(vals) if vals else 0.0
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else 0.0
        scale = (std if std > 1e-12 else math.inf) if mode == "standardised" else 1.0
        out.append([TokenRelevance(t.position, t.text, (t.relevance - mean) / scale) for t in toks])
    return out


def rate_prepared(aligner: Aligner, prepared: InstructionText, cls_final: torch.Tensor) -> list[list[TokenRelevance]]:
    """Eqs. 6-7 per row: CLIP relevance to the row's image, mapped back to its LLM tokens.
    cls_final: (B, Dv) the post-layernormed final [CLS] of each row's image. Rows without instruction: []."""
    rated = aligner.relevance(prepared.clip_spans, prepared.clip_features, cls_final)
    out = []
    for b, pos in enumerate(prepared.positions):
        clip_spans, clip_rel = rated[b]
        rel = map_relevance(prepared.spans[b], clip_spans, clip_rel)
        text = prepared.texts[b]
        out.append([TokenRelevance(p, text[s:e], r) for p, (s, e), r in zip(pos, prepared.spans[b], rel)])
    return out


def rate_by_embedding(embeddings: torch.Tensor, instr: torch.Tensor, reference: torch.Tensor,
                      tokenizer=None, input_ids: torch.Tensor | None = None) -> list[list[TokenRelevance]]:
    """Table 6's 'threshold on the original text tokens': cosine between each instruction token's LLM input
    embedding and the row's projected visual [CLS]. embeddings: (B, L, D), reference: (B, D)."""
    cos = torch.nn.functional.cosine_similarity(embeddings.float(), reference.float()[:, None], dim=-1)  # (B, L)
    out = []
    for b in range(instr.shape[0]):
        pos = torch.nonzero(instr[b]).flatten().tolist()
        names = (tokenizer.convert_ids_to_tokens(input_ids[b, pos].tolist())
                 if tokenizer is not None and input_ids is not None else [""] * len(pos))
        out.append([TokenRelevance(p, n, float(cos[b, p])) for p, n in zip(pos, names)])
    return out


def select(rated: list[list[TokenRelevance]], tau: float, shape: tuple[int, int], device) -> tuple[
        torch.Tensor, list[RowGuidance]]:
    """Eq. 8's indicator: tokens with relevance >= tau. Returns the (B, L) mask and the per-row report."""
    mask = torch.zeros(shape, dtype=torch.bool)  # filled on the host, then copied once
    rows = []
    for b, toks in enumerate(rated):
        chosen = [t for t in toks if not math.isnan(t.relevance) and t.relevance >= tau]
        mask[b, [t.position for t in chosen]] = True
        rows.append(RowGuidance("text" if chosen else "visual", chosen, toks))
    return mask.to(device, non_blocking=True), rows
