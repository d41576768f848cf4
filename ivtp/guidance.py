"""Which instruction tokens form the pseudo-CLS (IVTP eq. 8 and the Table 6 variants).

The instruction of a row is its text after its last image: LLaVA-1.5 puts the image first in the user turn.
Tokens the model is trained to produce (labels != -100) and everything after the first of them are not
instruction, nor is anything past `prompt_len` (what generate appended), nor padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ivtp.aligner import Aligner, Span, TokenRelevance, llm_token_spans, overlaps


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
    token features (`prepare_clip`). `rate_clip` finishes the job once the image's [CLS] is known."""

    positions: list[list[int]]  # per row: positions of its instruction tokens in the LLM input
    texts: list[str]  # per row: the text they decode to (CLIP reads it with any template phrases blanked)
    spans: list[list[Span]]  # per row: each LLM token's character span in that text
    clip_spans: list[list[Span]]  # per row: each CLIP token's character span
    clip_features: torch.Tensor  # (B, C, E) unit CLIP features of every token, start token first
    weights: torch.Tensor  # (B, L, C) eq. 7 as a matrix: LLM token p averages the CLIP tokens it overlaps

    def token_texts(self) -> list[dict[int, str]]:
        """Per row: the text of each rated position, for the report."""
        return [{p: text[a:b] for p, (a, b) in zip(pos, sp)}
                for pos, text, sp in zip(self.positions, self.texts, self.spans)]


def prepare_clip(aligner: Aligner, tokenizer, input_ids: torch.Tensor, instr: torch.Tensor,
                 template_phrases=(), width: int | None = None) -> InstructionText:
    """Decode each row's instruction tokens to text and run CLIP's text tower on them. instr: (B, L) bool.

    `template_phrases` (llm.instruction 'question'): every occurrence of them in the text is blanked before CLIP
    reads it (spaces: character offsets stay put), and tokens with no other character are not rated. `width`:
    CLIP tokens per row, padded (a compiled prefill needs one shape; the extra tokens weigh nothing)."""
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
    clip_spans, features = aligner.text_features(clip_texts, width)
    weights = torch.zeros(len(positions), ids.shape[1], features.shape[1])  # built on the host, copied once
    for b, pos in enumerate(positions):
        for p, hits in zip(pos, overlaps(spans[b], clip_spans[b])):
            if hits:
                weights[b, p, [1 + j for j in hits]] = 1.0 / len(hits)  # +1: the start token comes first
    weights = weights.to(features.device, non_blocking=True)
    return InstructionText(positions, texts, spans, clip_spans, features, weights)


def rate_clip(aligner: Aligner, clip_features: torch.Tensor, weights: torch.Tensor,
              cls_final: torch.Tensor) -> torch.Tensor:
    """Eqs. 6-7 on the device: each CLIP token's cosine to its row's image, averaged into the LLM tokens that
    overlap it. clip_features: (B, C, E), weights: (B, L, C) (InstructionText), cls_final: (B, Dv) the
    post-layernormed final [CLS] of each row's image. Returns (B, L) float32, nan where no token is rated."""
    image = torch.nn.functional.normalize(aligner.image_features(cls_final).float(), dim=-1)  # (B, E)
    cos = torch.einsum("bce,be->bc", clip_features.float(), image)  # (B, C)
    rel = torch.bmm(weights.float(), cos[:, :, None])[..., 0]  # (B, L)
    return torch.where(weights.any(-1), rel, torch.nan)


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


def standardise(rel: torch.Tensor, mode: str) -> torch.Tensor:
    """Relevance as llm.relevance reads it. rel: (B, L), nan where a token is not rated. 'cosine' as rated (the
    paper); 'centred' minus the row's mean over its rated tokens; 'standardised' centred and divided by the row's
    (population) standard deviation (a row with one rated token, or all equal, gets 0)."""
    if mode == "cosine":
        return rel
    rated = ~rel.isnan()  # (B, L)
    n = rated.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    centred = rel - torch.where(rated, rel, 0.0).sum(-1, keepdim=True) / n  # nan stays nan
    if mode == "centred":
        return centred
    std = (torch.where(rated, centred, 0.0).square().sum(-1, keepdim=True) / n).sqrt()  # (B, 1)
    return torch.where(std > 1e-12, centred / std.clamp_min(1e-12), centred * 0.0)


def rate_by_embedding(embeddings: torch.Tensor, instr: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Table 6's 'threshold on the original text tokens': cosine between each instruction token's LLM input
    embedding and the row's projected visual [CLS]. embeddings: (B, L, D), instr: (B, L), reference: (B, D).
    Returns (B, L) float32, nan outside the instruction."""
    cos = torch.nn.functional.cosine_similarity(embeddings.float(), reference.float()[:, None], dim=-1)  # (B, L)
    return torch.where(instr, cos, torch.nan)


@dataclass
class GuidanceReport:
    """What eq. 8 selected in one prefill, kept as device tensors; the per-row report (RowGuidance) is read on the
    host only when asked for, so a prefill waits on no copy for it (and a compiled one has none to break on)."""

    relevance: torch.Tensor  # (B, L) as thresholded, nan where not rated
    select: torch.Tensor  # (B, L) bool: the tokens that form the pseudo-CLS
    instr: torch.Tensor  # (B, L) bool: the instruction
    instruction: InstructionText | None = None  # CLIP guidance: the rated tokens and their text
    _rows: list | None = None

    def rows(self) -> list[RowGuidance]:
        if self._rows is None:
            rel, select, instr = (x.detach().cpu() for x in (self.relevance, self.select, self.instr))
            texts = self.instruction.token_texts() if self.instruction is not None else None
            self._rows = []
            for b in range(rel.shape[0]):
                positions = (self.instruction.positions[b] if texts is not None
                             else torch.nonzero(instr[b] & ~rel[b].isnan()).flatten().tolist())
                toks = [TokenRelevance(p, texts[b][p] if texts else "", float(rel[b, p])) for p in positions]
                chosen = [t for t in toks if bool(select[b, t.position])]
                self._rows.append(RowGuidance("text" if chosen else "visual", chosen, toks))
        return self._rows
