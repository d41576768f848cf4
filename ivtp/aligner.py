"""The CLIP-text aligner behind IVTP's pseudo-CLS (paper eqs. 5-7, DESIGN.md section 5).

- eq. 5-6: the CLIP text encoder runs on the instruction; every token (not just the pooled end-of-text token that
  open_clip's `encode_text` returns) is projected into the joint space (`ln_final`, then `text_projection`) and
  compared by cosine with the image's [CLS] in the same space (the tower's `post_layernorm`, then `visual.proj`).
- eq. 7: CLIP's BPE tokens are mapped to the LLM's tokens by character offsets; an LLM token takes the mean
  relevance of the CLIP tokens it overlaps (one, when it lies inside a CLIP token).

Only the text tower and the visual projection are kept in memory: the image side comes from LLaVA's own tower.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass

import regex
import torch
from torch import nn

from ivtp.config import AlignerConfig, ConfigError

logger = logging.getLogger(__name__)

TINY_MODEL = "ivtp-tiny-clip"  # a small text tower shipped for tests (vision width 32, like tiny-random)
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "open_clip")

Span = tuple[int, int]


@dataclass
class TokenRelevance:
    """Relevance of one LLM instruction token (eq. 7)."""

    position: int  # index in the LLM input sequence
    text: str  # the characters it covers
    relevance: float  # mean cosine of the CLIP tokens it overlaps; nan if it overlaps none (whitespace)


class Aligner(nn.Module):
    """CLIP text tower + visual projection, with the tokenizer needed for character offsets."""

    def __init__(self, clip_model: nn.Module, visual_proj: torch.Tensor, clip_tokenizer, name: str = "custom",
                 config_name: str | None = None):
        super().__init__()
        self.name = name  # what it was built from, for reports
        self.config_name = config_name  # the open_clip model config it fits (what save_pretrained records)
        self.text = clip_model
        self.visual_proj = nn.Parameter(visual_proj.detach().clone(), requires_grad=False)  # (Dv, E)
        self.tokenizer = clip_tokenizer
        self.context_length = int(clip_model.positional_embedding.shape[0])
        self.requires_grad_(False)
        transformer = clip_model.transformer
        # open_clip's plain blocks run through `_lean_block`: the same arithmetic in about a third of the
        # operations (each costs host time, and on a GPU the text tower is bound by the host).
        self._lean = getattr(transformer, "batch_first", False) and all(_lean_ok(b) for b in transformer.resblocks)
        mask = clip_model.attn_mask  # CLIP's causal mask: -inf above the diagonal, which SDPA's is_causal is
        self._triu_mask = mask is not None and torch.equal(mask, torch.full_like(mask, -math.inf).triu(1))

    @property
    def vision_width(self) -> int:
        return int(self.visual_proj.shape[0])

    @classmethod
    def from_config(cls, cfg: AlignerConfig) -> "Aligner":
        import open_clip

        shipped = os.path.join(_ASSETS, f"{cfg.model}.json")
        if os.path.isfile(shipped):  # the small configs this package ships for its random-weight presets
            open_clip.add_model_config(shipped)
        pretrained = cfg.pretrained
        local = False
        if pretrained is None:
            warnings.warn(f"aligner {cfg.model}: pretrained is null, using RANDOM weights (for tests only)")
        elif os.path.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"aligner checkpoint not found: {pretrained}")
            local = True
        try:  # a local file: random weights first, then our loader (it accepts text-tower-only checkpoints)
            if local:  # open_clip would log "initialized randomly", which is true only until the load below
                logging.disable(logging.WARNING)
            model = open_clip.create_model(cfg.model, pretrained=None if local else pretrained)
        except RuntimeError as e:  # open_clip reports unknown names and unreachable weights this way
            raise ConfigError(f"llm.aligner: cannot build {cfg.model!r} with pretrained={pretrained!r}: {e}") from e
        finally:
            logging.disable(logging.NOTSET)
        if local:
            load_text_tower(model, pretrained, cfg.model)
        visual_proj = model.visual.proj
        if visual_proj is None:
            raise ConfigError(f"llm.aligner: {cfg.model} has no visual projection (visual.proj)")
        model.visual = None  # LLaVA's tower supplies the image side
        return cls(model, visual_proj, open_clip.get_tokenizer(cfg.model), f"{cfg.model} (pretrained={pretrained})",
                   cfg.model)

    # ---- beside a checkpoint's weights ----------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> str:
        """Write the aligner into a checkpoint folder (ALIGNER_FILE: the text tower and visual.proj, as
        `load_text_tower` reads them; ALIGNER_META: the open_clip config they fit), so the folder loads back
        with the aligner its stage 2 ran with. Returns the weights' path."""
        from safetensors.torch import save_file

        from ivtp.names import ALIGNER_FILE, ALIGNER_META

        if self.config_name is None:
            raise ValueError("this aligner was not built from an open_clip model config (Aligner.from_config): "
                             "there is no config to record beside its weights")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ALIGNER_FILE)
        save_file({k: t.detach().contiguous() for k, t in text_state_dict(self).items()}, path,
                  metadata={"format": "ivtp-aligner", "model": self.config_name})
        with open(os.path.join(folder, ALIGNER_META), "w") as f:
            json.dump({"model": self.config_name}, f)
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Aligner":
        """The aligner a checkpoint folder carries (save_pretrained, or the testbed's export)."""
        from ivtp.names import ALIGNER_FILE, ALIGNER_META

        with open(os.path.join(folder, ALIGNER_META)) as f:
            model = json.load(f)["model"]
        return cls.from_config(AlignerConfig(model=model, pretrained=os.path.join(folder, ALIGNER_FILE))).eval()

    # ---- eq. 5-6 ------------------------------------------------------------------------------------------
    @property
    def causal(self) -> bool:
        """Whether the text tower is causal (CLIP's is): then a token's features ignore every later token."""
        return self.text.attn_mask is not None

    def token_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Joint-space features of every text token. ids: (B, C) -> (B, C, E), for C up to the context length
        (a causal tower gives the first C tokens the features they have in the full context)."""
        m = self.text
        n = ids.shape[1]
        if n != self.context_length and not self.causal:
            raise ValueError(f"a non-causal text tower takes the full context of {self.context_length} tokens, not {n}")
        x = m.token_embedding(ids)  # (B, C, W)
        x = x + m.positional_embedding[:n].to(x.dtype)
        mask = None if m.attn_mask is None else m.attn_mask[:n, :n]
        if self._lean:
            for block in m.transformer.resblocks:
                x = _lean_block(block, x, mask, self._triu_mask)
        else:
            x = m.transformer(x, attn_mask=mask)
        x = m.ln_final(x)
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (B, C, E)

    def image_features(self, cls_final: torch.Tensor) -> torch.Tensor:
        """The image [CLS] in the joint space. cls_final: (B, Dv), already post-layernormed -> (B, E)."""
        return cls_final.to(self.visual_proj.dtype) @ self.visual_proj

    def text_features(self, texts: list[str], width: int | None = None) -> tuple[list[list[Span]], torch.Tensor]:
        """The character spans of each text's CLIP tokens, and the unit joint-space features of every token
        (B, C, E), start token first. They need no image, so a caller can compute them before the vision tower
        runs (on a GPU the host's tokenising then overlaps the tower's kernels). `width`: C, at least (the
        context length fits every text); by default as wide as the longest text needs."""
        tokenized = [clip_tokens_with_offsets(self.tokenizer, t, self.context_length - 2) for t in texts]
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        # A causal tower needs no padding past the longest text (its tokens cannot see it): about half the work
        # for a typical instruction.
        need = 2 + max((len(tok_ids) for tok_ids, _ in tokenized), default=0) if self.causal else self.context_length
        width = max(need, width or 0)
        ids = torch.zeros(len(texts), width, dtype=torch.long)  # built on the host, copied once
        for b, (tok_ids, _) in enumerate(tokenized):
            row = [sot] + tok_ids + [eot]
            ids[b, : len(row)] = torch.tensor(row)
        with torch.no_grad():
            feats = self.token_features(ids.to(self.visual_proj.device, non_blocking=True))  # (B, C, E)
            return [spans for _, spans in tokenized], torch.nn.functional.normalize(feats.float(), dim=-1)

    def relevance(self, spans: list[list[Span]], text: torch.Tensor,
                  cls_final: torch.Tensor) -> list[tuple[list[Span], torch.Tensor]]:
        """Eq. 6 from `text_features`' output: each CLIP token's cosine to its row's image, on the host."""
        with torch.no_grad():
            image = torch.nn.functional.normalize(self.image_features(cls_final.to(text.device)).float(), dim=-1)
            cos = torch.einsum("bce,be->bc", text, image).cpu()  # (B, C): one copy for every row
        return [(sp, cos[b, 1 : 1 + len(sp)]) for b, sp in enumerate(spans)]

    def clip_relevance(self, texts: list[str], cls_final: torch.Tensor) -> list[tuple[list[Span], torch.Tensor]]:
        """For each text: the character spans of its CLIP tokens and their cosine to that row's image (eq. 6)."""
        return self.relevance(*self.text_features(texts), cls_final)


def _lean_ok(block: nn.Module) -> bool:
    """Whether a text block is open_clip's plain ResidualAttentionBlock around a standard self-attention."""
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim
            and attn.in_proj_weight is not None and attn.bias_k is None and not attn.add_zero_attn
            and attn.dropout == 0.0)


def _lean_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """One ResidualAttentionBlock in inference: x (B, C, W) -> (B, C, W), as block(x, attn_mask=mask) computes it.

    nn.MultiheadAttention's general path spends some 25 operations per call on layout; here the projection is one
    GEMM, q/k/v views of it, and SDPA (causal by flag when the mask is CLIP's triangle)."""
    attn = block.attn
    b, c, w = x.shape
    heads = attn.num_heads
    qkv = nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, C, 3W)
    q, k, v = qkv.view(b, c, 3, heads, w // heads).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, C, W/h)
    if mask is None or causal:
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=mask is not None)
    else:
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    x = x + block.ls_1(attn.out_proj(o.transpose(1, 2).reshape(b, c, w)))  # (B, C, W)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


EMBED_ROWS, EMBED_IDS = "token_embedding.rows", "token_embedding.ids"  # a partial embedding table (see below)


def text_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the aligner needs from an open_clip CLIP, or from an `Aligner` (its text tower and projection): every
    text-tower tensor and `visual.proj` (the inverse of `load_text_tower`)."""
    text, proj = (model.text, model.visual_proj) if isinstance(model, Aligner) else (model, model.visual.proj)
    sd = {k: t for k, t in text.state_dict().items()
          if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
    sd["visual.proj"] = proj
    return sd


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # an open_clip training checkpoint
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ConfigError(f"llm.aligner: {path} does not hold a state dict")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_text_tower(model: nn.Module, path: str, name: str = "the model") -> None:
    """Load the aligner's weights from a local checkpoint (safetensors, or a torch file) into an open_clip CLIP.

    Every text-tower tensor and `visual.proj` must be there; the vision tower's may be absent (LLaVA's own tower
    supplies the image side, so they are not used). The token embedding is either `token_embedding.weight` or a
    partial table, `token_embedding.rows` (k, W) with the BPE ids they belong to in `token_embedding.ids` (k,):
    ids outside it get a zero embedding (the testbed's aligner stores only the ids its texts use).
    """
    sd = _read_state_dict(path)
    expected = model.state_dict()
    if EMBED_ROWS in sd or EMBED_IDS in sd:
        if EMBED_ROWS not in sd or EMBED_IDS not in sd:
            raise ConfigError(f"llm.aligner: {path} has only one of {EMBED_ROWS} and {EMBED_IDS}")
        rows, ids = sd.pop(EMBED_ROWS), sd.pop(EMBED_IDS).long()
        table = expected["token_embedding.weight"]
        if rows.ndim != 2 or rows.shape[1] != table.shape[1] or ids.shape != (rows.shape[0],) or (
                ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0])):
            raise ConfigError(f"llm.aligner: {path}: {EMBED_ROWS} {tuple(rows.shape)} / {EMBED_IDS} "
                              f"{tuple(ids.shape)} do not fit a token embedding of {tuple(table.shape)}")
        weight = torch.zeros_like(table)
        weight[ids] = rows.to(weight.dtype)
        sd["token_embedding.weight"] = weight
    needed = [k for k in expected if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")]
    needed.append("visual.proj")
    missing = [k for k in needed if k not in sd]
    if missing:
        groups: dict[str, list[str]] = {}
        for k in missing:
            groups.setdefault(k.split(".")[0], []).append(k)
        shown = ", ".join(", ".join(g) if len(g) <= 2 else f"{p}.* ({len(g)} tensors)" for p, g in groups.items())
        raise ConfigError(f"llm.aligner: {path} lacks the aligner weights of {name} (the text tower and "
                          f"visual.proj): missing {shown}")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})" for k in needed
             if sd[k].shape != expected[k].shape]
    wrong += [f"unexpected {k}" for k in sd if k not in expected and not k.startswith("visual.")]
    if wrong:
        raise ConfigError(f"llm.aligner: {path} does not match {name}: {'; '.join(wrong[:8])}")
    model.load_state_dict({k: sd[k] for k in needed}, strict=False)  # the vision tower keeps random weights


def clip_tokens_with_offsets(tokenizer, text: str, max_tokens: int) -> tuple[list[int], list[Span]]:
    """CLIP BPE ids of `text` with the character span of each, in the original string.

    open_clip's tokenizer lower-cases, collapses whitespace and splits words with its regex before BPE; none of
    that moves characters within a word, so running the same regex over the (length-preserving) lower-cased text
    gives each word's offsets, and BPE pieces split a word left to right. Tokens past `max_tokens` (the context
    window) are dropped, as the tokenizer truncates them.
    """
    lowered = text.lower() if text.isascii() else "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    ids: list[int] = []
    spans: list[Span] = []
    for match in regex.finditer(tokenizer.pat, lowered):
        word = match.group()
        encoded = "".join(tokenizer.byte_encoder[b] for b in word.encode("utf-8"))
        pieces = tokenizer.bpe(encoded).split(" ")
        # Byte offsets of the pieces -> character offsets within the word (the same for ASCII).
        if word.isascii():
            char_at_byte = range(len(word) + 1)
        else:
            char_at_byte = []
            for i, ch in enumerate(word):
                char_at_byte.extend([i] * len(ch.encode("utf-8")))
            char_at_byte.append(len(word))
        byte_pos = 0
        for piece in pieces:
            n_bytes = len(piece.replace("</w>", ""))
            start, end = char_at_byte[byte_pos], char_at_byte[byte_pos + n_bytes]
            ids.append(tokenizer.encoder[piece])
            spans.append((match.start() + start, match.start() + end))
            byte_pos += n_bytes
    return ids[:max_tokens], spans[:max_tokens]


def llm_token_spans(tokenizer, ids: list[int], window: int = 16) -> tuple[str, list[Span]]:
    """The text that LLM token ids decode to, with each token's character span in it.

    Each token's text is what decoding gains when the token is appended, found with the tokenizer's own
    `convert_tokens_to_string`, so it works for SentencePiece ("\u2581word") and byte-level ("\u0120word")
    vocabularies alike. Only a few tokens before it (`window` to 2 * `window`) are decoded with it, not the whole
    prefix: decoding is local (a leading-space rule at the start of a decode applies to both texts compared), and
    the cost stays linear in the instruction's length instead of quadratic: one decode per token.
    """
    tokens = tokenizer.convert_ids_to_tokens(ids)
    spans: list[Span] = []
    text, before, anchor = "", "", 0
    for i in range(len(tokens)):
        if i % window == 0:  # a new block of `window` tokens, decoded with the `window` tokens before it
            anchor = max(0, i - window)
            before = tokenizer.convert_tokens_to_string(tokens[anchor:i]) if i > anchor else ""
        # Within a block the context only grows (window to 2 * window tokens), so each token costs one decode:
        # this token's text with its context is the next token's context.
        after = tokenizer.convert_tokens_to_string(tokens[anchor : i + 1])
        # A decoder that rewrites earlier text (an incomplete byte sequence completed, say): the token alone.
        piece = after[len(before):] if after.startswith(before) else (
            tokenizer.convert_tokens_to_string(tokens[i : i + 1]))
        spans.append((len(text), len(text) + len(piece)))
        text += piece
        before = after
    return text, spans


def overlaps(llm_spans: list[Span], clip_spans: list[Span]) -> list[list[int]]:
    """Eq. 7's sets: for each LLM token, the indices of the CLIP tokens whose characters it overlaps.

    Leading whitespace of an LLM token does not count as overlap. A token that overlaps no CLIP token (only
    whitespace, or past CLIP's context window) gets an empty set: it is not rated.
    """
    out = []
    first = 0  # both span lists run left to right: the first CLIP token that may still overlap only moves on
    for a, b in llm_spans:
        while first < len(clip_spans) and clip_spans[first][1] <= a:
            first += 1
        hits, j = [], first
        while j < len(clip_spans) and clip_spans[j][0] < b:
            if a < clip_spans[j][1]:
                hits.append(j)
            j += 1
        out.append(hits)
    return out


def map_relevance(llm_spans: list[Span], clip_spans: list[Span], clip_rel: torch.Tensor) -> list[float]:
    """Eq. 7: each LLM token's relevance is the mean over the CLIP tokens whose characters it overlaps (`overlaps`);
    nan for a token that overlaps none, which never passes a threshold."""
    rel = clip_rel.tolist()  # one copy to the host, not one per overlap (each would wait for the device)
    return [sum(rel[j] for j in hits) / len(hits) if hits else math.nan for hits in overlaps(llm_spans, clip_spans)]
