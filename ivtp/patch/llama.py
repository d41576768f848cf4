"""Pruning inside the LLM: the decoder loop that runs a method's plan (IVTP's stage 2, sections 3.3-3.4, and the
in-LLM peers). It names no method: each method's `LLMStep` (ivtp/methods/) says what a layer's attention must
score and which visual tokens stay; this module supplies the probes and the slot bookkeeping.

- `GTPLlamaAttention` (class swap, forward only): the attention output still comes from the configured
  implementation; when handed a probe it also scores the visual tokens from the layer's own q/k/v: among
  {visual tokens, pseudo-CLS} (the full head-mean matrix, or the pseudo-CLS row), or the attention of chosen
  query tokens (raters) over their whole causal row. The pseudo-CLS only queries: its key and value are computed
  for the probe and never enter the KV cache.
- `PrunedLlamaModel.forward` replaces the decoder loop. At each group's top layer the step drops visual tokens;
  later layers get the kept tokens' hidden states, position ids, RoPE and a mask gathered with the same
  indices, so kept tokens keep their original positions. Rows that keep different numbers of tokens (text-only
  rows, rows with more images) carry invalid slots at their end, masked as keys. Dropped tokens leave their
  hidden state where they left, so the output is as long as the input: logits, labels and generate's
  bookkeeping stay aligned. The kept slots of each segment are stored on the cache, so decoding attends to
  exactly the tokens each layer kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward, repeat_kv
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ivtp.ops import fused_maps, head_mean_attention, value_norms
from ivtp.patch.probe import Probe

SUPPORTED_ATTENTION = ("sdpa", "eager")
# Keys of the masks generate builds ahead of a decode step (DecodeState.premade_masks): the stock layers', and
# each pruned segment's.
STOCK_MASK, SEGMENT_MASK = "full_attention", "ivtp_segment_"


# ---- plan ----------------------------------------------------------------------------------------------------
@dataclass
class LLMPlan:
    """What the decoder runs: after the top layer of each group, the visual tokens per image go down to that
    group's count; `step` (an ivtp.methods.base.LLMStep, the method's own module) decides which, and how."""

    groups: list[tuple[int, int]]  # inclusive decoder-layer ranges
    counts: list[int]  # visual tokens per image after each group
    tokens_in: int  # visual tokens per image stage 1 hands on
    step: object  # LLMStep: what the method asks of a layer's attention, and what it keeps

    def step_names(self) -> list[str]:
        prefix = self.step.prefix
        return [f"{prefix}.layers{lo}-{hi}" if lo != hi else f"{prefix}.layer{lo}" for lo, hi in self.groups]

    def tokens_per_layer(self, num_layers: int) -> list[int]:
        """Visual tokens per image that each decoder layer processes."""
        out, current = [], self.tokens_in
        for layer in range(num_layers):
            out.append(current)
            for (_, hi), count in zip(self.groups, self.counts):
                if hi == layer:
                    current = count
        return out


@dataclass(frozen=True)
class PrefillShape:
    """What the host knows of a prefill before it runs (a compiled prefill, ivtp/compiled.py): with it the slot
    bookkeeping reads nothing back from the device, and every width is a constant of the graph."""

    images: tuple[int, ...]  # images per row
    padded: bool  # the attention mask hides some position


@dataclass
class LLMGuidance:
    """What the LLaVA level hands the decoder for one prefill: where the visual tokens are and what the
    pseudo-CLS is made of."""

    visual: torch.Tensor  # (B, L) bool: visual token positions
    images: torch.Tensor  # (B,) int64: images per row (LLaVA-NeXT: crops, the unit its budgets count)
    text_select: torch.Tensor  # (B, L) bool: instruction tokens that form the pseudo-CLS (may be none)
    fallback: torch.Tensor  # (B, D): the pseudo-CLS of rows with no selected token (projected visual [CLS])
    last_prompt: torch.Tensor | None = None  # (B,) position of each row's last prompt token (FastV's query)
    shape: PrefillShape | None = None  # given by a compiled prefill
    # LLaVA-NeXT's stock layout (padding cut, newlines), whose rows hold no whole number of crops' tokens: (B,)
    # float, each row's visual tokens in crops' worth (tokens / tokens_in). A budget per crop then keeps that share
    # of the row's tokens (_PrefillRun.budget). None: every image holds exactly `images` x tokens_in.
    units: torch.Tensor | None = None


@dataclass
class LLMTrace:
    """What the last prefill's in-LLM stage did. The positions are kept as device tensors and read on the host
    when first asked for (a prefill waits on no copy for them)."""

    counts: list[list[int]]  # per row: visual tokens in and after each group
    scores: list[torch.Tensor] = field(default_factory=list)  # per group: (rows with images, Nv) eq.-4 scores
    visual: torch.Tensor | None = None  # (B, L) bool: the visual tokens entering the LLM
    kept: tuple | None = None  # (slot_pos, slot_visual), each (B, S), after the last group; None: nothing dropped
    _positions: tuple | None = None

    def _resolve(self) -> tuple:
        if self._positions is None:
            first, last = [row[0] if row else 0 for row in self.counts], [row[-1] if row else 0 for row in self.counts]
            entering = list(torch.split(torch.nonzero(self.visual)[:, 1], first))
            if self.kept is None:
                self._positions = entering, list(entering)
            else:
                slot_pos, slot_visual = self.kept
                self._positions = entering, list(torch.split(slot_pos[slot_visual], last))
        return self._positions

    @property
    def visual_positions(self) -> list[torch.Tensor]:
        """Per row: the positions of the visual tokens entering the LLM."""
        return self._resolve()[0]

    @property
    def kept_positions(self) -> list[torch.Tensor]:
        """Per row: those left after the last group."""
        return self._resolve()[1]


# ---- attention probe ---------------------------------------------------------------------------------------------
class GTPLlamaAttention(nn.Module):
    """Mixin forward for LlamaAttention; `patch_llama_attention` builds the concrete subclass."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                ivtp_probe: Probe | None = None, **kwargs):
        if ivtp_probe is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        input_shape = hidden_states.shape[:-1]
        b, length = input_shape
        hidden_shape = (*input_shape, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, L, Dh)
        pcls_x = ivtp_probe.get("pcls_x")  # (B', 1, D), already through this layer's input norm
        if pcls_x is None:
            query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, L, Dh)
            key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, L, Dh)
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        else:
            # The pseudo-CLS rides along as one more column of the layer's own q/k projections and RoPE: one
            # GEMM each, instead of a second pass over the weights for a single token (which costs a CPU as much
            # as tens of sequence tokens, since a one-token product is bound by reading the weights), and one
            # RoPE call (`joint_rope` holds the sequence's cos/sin with the pseudo-CLS position appended).
            rows = ivtp_probe["rows"]
            if ivtp_probe["all_rows"]:  # every row is scored: no zero rows to fill, no rows to pick
                extra, rows = pcls_x.to(hidden_states.dtype), slice(None)
            else:
                extra = hidden_states.new_zeros(b, 1, hidden_states.shape[-1])
                extra[rows] = pcls_x.to(hidden_states.dtype)
            joint = torch.cat([hidden_states, extra], dim=1)  # (B, L + 1, D)
            joint_shape = (b, length + 1, -1, self.head_dim)
            query = self.q_proj(joint).view(joint_shape).transpose(1, 2)  # (B, H, L + 1, Dh)
            key = self.k_proj(joint).view(joint_shape).transpose(1, 2)  # (B, Hkv, L + 1, Dh)
            query, key = apply_rotary_pos_emb(query, key, *ivtp_probe["joint_rope"])
            ivtp_probe["pcls_q"] = query[rows, :, length:]  # (B', H, 1, Dh)
            ivtp_probe["pcls_k"] = key[rows, :, length:]  # (B', Hkv, 1, Dh)
            query, key = query[:, :, :length], key[:, :, :length]  # (B, H, L, Dh), (B, Hkv, L, Dh)
        with torch.no_grad(), torch.profiler.record_function("ivtp.score"):  # a decision: no graph kept
            _probe_scores(self, ivtp_probe, query, key, value)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                                 **kwargs)
        # The weights (eager only) go back as the stock layer returns them, so output_attentions lists every layer.
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _probe_scores(attn, probe: Probe, query, key, value) -> None:
    """Attention among {visual tokens of the scored rows, pseudo-CLS}, which sits after them (causal).

    probe: rows (B',), vis_idx (B', Nv) slot indices (ascending), vis_ok (B', Nv), pcls_q (B', H, 1, Dh) and
    pcls_k (B', Hkv, 1, Dh), both with RoPE applied; mode 'full' or 'row'. Writes 'attn' or 'row' and 'vnorm'.
    """
    rows, idx = probe["rows"], probe["vis_idx"]
    n_rep = attn.num_key_value_groups
    neg = torch.finfo(torch.float32).min

    def take(x, index=idx):  # (B, h, L, Dh) -> (B', h, n, Dh)
        x = x if probe["all_rows"] else x[rows]
        return torch.gather(x, 2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))

    if "rater_idx" in probe:
        # SparseVLM's raters, FastV's last prompt token: each rater's softmax runs over every key it sees (its whole
        # causal row, padding out), and the visual columns are read from it; no renormalisation over them.
        q = take(query, probe["rater_idx"])  # (B', H, Nt, Dh)
        keys = repeat_kv(key[rows], n_rep)  # (B', H, S, Dh)
        slots = torch.arange(keys.shape[2], device=keys.device)
        allowed = (slots[None, None, :] <= probe["rater_idx"][:, :, None]) & probe["key_ok"][:, None, :]  # (B', Nt, S)
        logits = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * attn.scaling  # (B', H, Nt, S)
        probs = logits.masked_fill(~allowed[:, None], neg).softmax(-1)
        columns = idx[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)  # (B', H, Nt, Nv)
        probe["attn_visual"] = torch.gather(probs, 3, columns)
        return

    keys = repeat_kv(torch.cat([take(key), probe["pcls_k"]], dim=2), n_rep)  # (B', H, Nv + 1, Dh)
    if probe["mode"] == "full":
        queries = torch.cat([take(query), probe["pcls_q"]], dim=2)  # (B', H, Nv + 1, Dh)
        probe["attn"] = None
        if fused_maps.available(queries):  # Triton, no (B', H, n, n) tensor (ivtp/ops/fused_maps.py)
            probe["attn"] = fused_maps.maps(queries, keys, attn.scaling, probe["pcls_key_ok"], causal=True)
        if probe["attn"] is None:
            probe["attn"] = head_mean_attention(queries, keys, attn.scaling, probe["mask"])  # (B', Nv + 1, Nv + 1)
    else:
        probe["row"] = head_mean_attention(probe["pcls_q"], keys, attn.scaling, probe["mask"])[:, 0]  # (B', Nv + 1)
        vn = value_norms(take(value))  # (B', Nv)
        probe["vnorm"] = torch.cat([vn, vn.new_zeros(vn.shape[0], 1)], dim=1)  # the query's own norm is unused


def probe_mask(key_ok: torch.Tensor, mode: str) -> torch.Tensor:
    """The additive float32 mask of a probe over {visual tokens, pseudo-CLS}, the pseudo-CLS last.

    key_ok: (B', Nv + 1) which entries are real (the pseudo-CLS always). 'full' (every query): causal, padded keys
    masked, each query sees at least itself -> (B', 1, Nv + 1, Nv + 1). 'row' (the pseudo-CLS query): padded keys
    masked -> (B', 1, 1, Nv + 1). They depend on the slots alone, so a run builds them once per segment."""
    neg = torch.finfo(torch.float32).min
    if mode == "row":
        return torch.where(key_ok, 0.0, neg)[:, None, None, :]
    n = key_ok.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=key_ok.device).tril()
    allowed = (causal & key_ok[:, None, :]) | torch.eye(n, dtype=torch.bool, device=key_ok.device)
    return torch.where(allowed, 0.0, neg)[:, None]


def patch_llama_attention(attn: nn.Module) -> None:
    if not isinstance(attn, GTPLlamaAttention):
        attn.__class__ = type(f"GTP{attn.__class__.__name__}", (GTPLlamaAttention, attn.__class__), {})


# ---- masks -------------------------------------------------------------------------------------------------------
def _format_mask(allowed: torch.Tensor, impl: str, dtype: torch.dtype, keys: int | None = None) -> torch.Tensor:
    """A (B, 1, q, k) boolean 'may attend' mask in the form the attention implementation takes, widened with
    hidden keys to `keys` columns: what the layer's cache hands attention (a static cache: all its slots)."""
    if keys is not None and keys > allowed.shape[-1]:
        allowed = nn.functional.pad(allowed, (0, keys - allowed.shape[-1]), value=False)  # (B, 1, q, keys)
    if impl == "sdpa":
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


def _key_width(cache, layer_idx: int, q_len: int, own: int) -> int:
    """How many keys layer `layer_idx`'s attention will see after its cache takes q_len new tokens: `own` (the
    segment's slots) for a growing cache or none, the cache's whole length for a static one (it returns every
    preallocated slot, the empty ones included)."""
    if cache is None:
        return own
    return max(own, int(cache.get_mask_sizes(q_len, layer_idx)[0]))


def _prefill_mask(slot_pos: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
    """slot_pos: (B, S) ascending original positions, key_ok: (B, S). Returns (B, 1, S, S) bool.

    Causal by original position, padding and filler keys masked. A query with no key left (left padding, a
    filler) may see itself, so no softmax row is empty; its output is never read.
    """
    allowed = (slot_pos[:, None, :] <= slot_pos[:, :, None]) & key_ok[:, None, :]  # (B, S, S)
    eye = torch.eye(slot_pos.shape[1], dtype=torch.bool, device=slot_pos.device)
    return (allowed | (eye & ~allowed.any(-1, keepdim=True)))[:, None]


def _decode_mask(seg_ok: torch.Tensor, attention_mask: torch.Tensor | None, prefill_len: int, past_len: int,
                 q_len: int) -> torch.Tensor:
    """Mask for q_len new tokens at a pruned layer whose cache holds the segment's prefill slots, then every
    token decoded since. seg_ok: (B, S). Returns (B, 1, q_len, S + past_len - prefill_len + q_len) bool."""
    b, s = seg_ok.shape
    n_new = past_len - prefill_len + q_len  # tokens after the prompt, this step's included
    device = seg_ok.device
    new_ok = (attention_mask[:, prefill_len : prefill_len + n_new].bool() if attention_mask is not None
              else torch.ones(b, n_new, dtype=torch.bool, device=device))  # (B, n_new)
    own = torch.arange(q_len, device=device) + (past_len - prefill_len)  # each query's index among the new
    new_idx = torch.arange(n_new, device=device)
    causal = new_idx[None, :] <= own[:, None]  # (q, n_new)
    new_allowed = (new_ok[:, None, :] & causal[None]) | (new_idx[None, :] == own[:, None])[None]  # (B, q, n_new)
    old_allowed = seg_ok[:, None, :].expand(b, q_len, s)  # (B, q, S)
    return torch.cat([old_allowed, new_allowed], dim=-1)[:, None]


@dataclass
class DecodeState:
    """Stored on the KV cache after a pruned prefill."""

    prefill_len: int
    segments: list[tuple[int, torch.Tensor]]  # (first layer of the segment, key_ok (B, S) of its prefill slots)
    dense: list[bool]  # per segment: every prefill slot is a usable key (no padding, fillers), known on the host
    # per segment: None (positions kept), or (B,) how far a renumbered segment's positions sit below the input's:
    # a new token at position p takes p - shift in its layers, right after the survivors (drop_slots' renumber)
    shifts: list = field(default_factory=list)

    def positions(self, seg: int, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The new tokens' positions in segment `seg`'s layers, or None where they are the input's."""
        shift = self.shifts[seg] if self.shifts else None
        return None if shift is None else position_ids - shift[:, None]  # (B, q)

    def segment_for(self, layer_idx: int) -> int | None:
        """Index of the segment a layer belongs to (the last one starting at or before it), or None."""
        found = None
        for i, (first, _) in enumerate(self.segments):
            if first <= layer_idx:
                found = i
        return found

    def mask(self, seg: int, attention_mask, past_len: int, q_len: int, cache, impl: str, dtype,
             may_skip: bool = False) -> torch.Tensor | None:
        """The attention mask of segment `seg`'s layers for q_len new tokens after past_len cached ones, as wide
        as what their cache hands attention. may_skip: SDPA with one unpadded query, where a segment whose every
        slot is a key needs no mask (the stock layers get none either)."""
        first, seg_ok = self.segments[seg]  # seg_ok: (B, S)
        own = seg_ok.shape[1] + past_len - self.prefill_len + q_len  # prefill slots, then the new tokens
        keys = _key_width(cache, first, q_len, own)
        if may_skip and self.dense[seg] and keys == own:
            return None
        allowed = _decode_mask(seg_ok, attention_mask, self.prefill_len, past_len, q_len)
        return _format_mask(allowed, impl, dtype, keys)

    def premade_masks(self, stock_mask, attention_mask, past_len: int, q_len: int, cache, impl: str, dtype) -> dict:
        """The masks of one decode step built ahead of it (create_masks_for_generate, for a compiled step): the
        stock layers' `stock_mask` and every segment's, keyed as PrunedLlamaModel.forward reads them."""
        masks = {STOCK_MASK: stock_mask}
        for i in range(len(self.segments)):
            masks[f"{SEGMENT_MASK}{i}"] = self.mask(i, attention_mask, past_len, q_len, cache, impl, dtype)
        return masks


def _execution_device(layer: nn.Module) -> torch.device:
    """Where a decoder layer computes: the device accelerate's dispatch hook moves its inputs to (a model loaded
    with device_map or offloading), else the device of its weights."""
    hook = getattr(layer, "_hf_hook", None)
    device = next(layer.parameters()).device
    for h in getattr(hook, "hooks", [hook]):  # accelerate chains several hooks in a SequentialHook
        if getattr(h, "execution_device", None) is not None:
            device = h.execution_device
            device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            break
    if device.type == "cuda" and device.index is None:  # "cuda" means the current device; tensors name theirs
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_one_device(model, plan: LLMPlan, device: torch.device) -> None:
    """The slot bookkeeping lives on the embeddings' device, and every layer up to the last pruning step reads it
    (VisionDrop scores with the layer after its step). A model split across devices (device_map) must keep those
    layers on that device; the layers after them may sit anywhere."""
    last = max(hi for _, hi in plan.groups) + plan.step.layers_after
    layers = model.layers[: min(last + 1, len(model.layers))]
    elsewhere = sorted({f"{i}: {d}" for i, layer in enumerate(layers) if (d := _execution_device(layer)) != device})
    if elsewhere:
        raise ValueError(
            f"the in-LLM pruning steps need decoder layers 0-{last} on the device of the input embeddings ({device}), "
            f"but these layers run elsewhere: {', '.join(elsewhere)}. Load the model with a device_map that keeps "
            f"them together (the layers after {last} may sit on other devices), or on one device")


# ---- the decoder loop -------------------------------------------------------------------------------------------
class PrunedLlamaModel:
    """Mixin for LlamaModel: the decoder loop with in-LLM pruning."""

    ivtp_llm_plan: LLMPlan
    ivtp_state: object  # the model's PruningState, where the trace of the last prefill goes

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, ivtp_guidance: LLMGuidance | None = None, **kwargs):
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        run = None
        decode_masks: dict[int, torch.Tensor | None] = {}  # one mask per pruned segment, shared by its layers
        decode_positions: dict[int, tuple] = {}  # a renumbered segment's (position ids, cos/sin), shared likewise
        premade = isinstance(attention_mask, dict)
        if premade:
            # A decode step whose masks generate built beforehand (create_masks_for_generate, static cache): no
            # host read of the cache length, so a compiled step has no graph break here.
            decode = past_key_values.ivtp_decode
            past_len = past_key_values.get_seq_length()  # a tensor: used for positions only
            causal_mask = attention_mask[STOCK_MASK]
            decode_masks.update({i: attention_mask[f"{SEGMENT_MASK}{i}"] for i in range(len(decode.segments))})
        else:
            # A plain int: a static cache returns its layer-0 counter, a tensor that layer 0 advances in place.
            past_len = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
            decode = getattr(past_key_values, "ivtp_decode", None) if past_len > 0 else None
            if past_len == 0 and past_key_values is not None:  # a reused cache: forget the last prompt's segments
                past_key_values.ivtp_decode = None
        if position_ids is None:
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_len)[None]
        if not premade:
            causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask, past_key_values=past_key_values,
                                             position_ids=position_ids)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        layers = self.layers[: self.config.num_hidden_layers]

        if ivtp_guidance is not None and not premade and past_len == 0 and _has_images(ivtp_guidance):
            run = _PrefillRun(self, ivtp_guidance, hidden, attention_mask, position_ids, position_embeddings,
                              past_key_values)
        # The stock mask builder gives SDPA no mask for one new token without padding (create_causal_mask).
        sdpa_unmasked = (decode is not None and causal_mask is None and hidden.shape[1] == 1
                         and self.config._attn_implementation == "sdpa")
        for idx, layer in enumerate(layers):
            mask, pos_ids, pos_emb, probe = causal_mask, position_ids, position_embeddings, None
            if run is not None:
                if run.pruned:
                    mask, pos_ids, pos_emb = run.mask, run.position_ids, run.position_embeddings
                probe = run.probe(idx, layer, hidden)
            elif decode is not None and (seg := decode.segment_for(idx)) is not None:
                if seg not in decode_masks:
                    decode_masks[seg] = decode.mask(seg, attention_mask, past_len, hidden.shape[1], past_key_values,
                                                    self.config._attn_implementation, hidden.dtype, sdpa_unmasked)
                mask = decode_masks[seg]
                if seg not in decode_positions:
                    shifted = decode.positions(seg, position_ids)
                    decode_positions[seg] = (None if shifted is None else
                                             (shifted, self.rotary_emb(hidden, position_ids=shifted)))
                if decode_positions[seg] is not None:
                    pos_ids, pos_emb = decode_positions[seg]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=pos_emb, position_ids=pos_ids,
                           past_key_values=past_key_values, use_cache=use_cache, ivtp_probe=probe, **kwargs)
            if run is not None:
                hidden = run.after_layer(idx, hidden)
        if run is not None:
            hidden = run.finish(hidden)
            self.ivtp_state.last_llm_trace = run.trace
            if past_key_values is not None:
                past_key_values.ivtp_decode = DecodeState(inputs_embeds.shape[1], run.segments, run.dense,
                                                          run.shifts)
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)


def _has_images(guidance: LLMGuidance) -> bool:
    return any(guidance.shape.images) if guidance.shape is not None else bool(guidance.visual.any())


class _PrefillRun:
    """The slot bookkeeping of one pruned prefill. A slot is a sequence position still present in a row; rows
    that keep fewer tokens end in filler slots, which nothing attends to and whose outputs are discarded."""

    def __init__(self, model, guidance: LLMGuidance, hidden, attention_mask, position_ids, position_embeddings,
                 cache=None):
        self.model = model
        self.cache = cache  # the KV cache the layers fill (its kind sets how many keys a layer's attention sees)
        if guidance.shape is None:  # a compiled prefill checked it before it was traced (ivtp/compiled.py)
            _check_one_device(model, model.ivtp_llm_plan, hidden.device)
        self.plan: LLMPlan = model.ivtp_llm_plan
        self.g = guidance
        b, length = guidance.visual.shape
        device = hidden.device
        self.length = length
        self.slot_pos = torch.arange(length, device=device).expand(b, -1).clone()  # (B, S) original positions
        self.slot_real = torch.ones(b, length, dtype=torch.bool, device=device)  # (B, S) False: filler
        self.slot_ok = (attention_mask.bool().clone() if attention_mask is not None
                        else torch.ones(b, length, dtype=torch.bool, device=device))  # (B, S) usable as a key
        self.slot_visual = guidance.visual.clone()  # (B, S)
        self.full_position_ids = position_ids.expand(b, -1)
        self.full_embeddings = tuple(e.expand(b, -1, -1) for e in position_embeddings)
        self.exit_hidden = None  # (B, L + 1, D): dropped tokens' last hidden state (+1: a sink for fillers)
        self.pruned = False
        self.renumbered = False  # positions rebuilt from the survivors (drop_slots' renumber)
        self.mask = self.position_ids = self.position_embeddings = None
        self.n_visual = [guidance.visual.sum(-1)]  # per step, (B,) visual tokens per row (for the trace)
        self.known = guidance.shape  # PrefillShape: the host knows the rows, and no width is read back
        if self.known is None:
            # What the host must know of the rows, in one copy: per-row reads would each wait for the device.
            self.images, visual_counts = torch.stack([guidance.images, self.n_visual[0]]).tolist()
        else:  # the placeholders were counted (and checked) on the host before the prefill
            self.images = list(self.known.images)
            visual_counts = [n * self.plan.tokens_in for n in self.images]
        # Host-side counts of a known prefill: slots per row, visual tokens per image, after each drop.
        self.row_len, self.per_image = [length] * b, [self.plan.tokens_in]
        rows = [r for r in range(b) if self.images[r] > 0]  # rows that have visual tokens
        self.row_list = rows
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.all_rows = len(rows) == b  # then x[rows] is x itself: skip the copies
        self.segments: list[tuple[int, torch.Tensor]] = []
        self.dense: list[bool] = []  # per segment: every slot usable as a key (DecodeState)
        self.shifts: list = []  # per segment: None, or (B,) a renumbered segment's position shift (DecodeState)
        per_image = [visual_counts[r] // self.images[r] for r in rows]
        if guidance.units is None and any(n != self.plan.tokens_in for n in per_image):
            raise ValueError(f"stage 2 expected {self.plan.tokens_in} visual tokens per image, got {per_image}")
        self.trace = LLMTrace(counts=[])  # filled by finish()
        self.scratch: dict = {}  # the step's own state within a group (IVTP's attention maps of the lower layers)
        self.last_probe: Probe | None = None
        self._vis_slots: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pcls_slots: tuple | None = None  # _pseudo_cls' slot-dependent part
        self._masks: dict[str, torch.Tensor] = {}  # the probes' key_ok, and probe_mask per mode

    def budget(self, per_unit: int) -> torch.Tensor:
        """(B',) the visual tokens each scored row keeps at a budget of `per_unit` per image (LLaVA-NeXT: per crop;
        over its stock layout, that share of the row's tokens, rounded)."""
        if self.g.units is None:
            return per_unit * self.g.images[self.rows]
        share = (per_unit * self.g.units[self.rows]).round().long()  # (B',)
        return torch.minimum(share, self.n_visual[0][self.rows]).clamp_min(1)

    def _group_of(self, idx: int):
        for g, (lo, hi) in enumerate(self.plan.groups):
            if lo <= idx <= hi:
                return g, lo, hi
        return None

    # -- what the plan's step asks of each layer -----------------------------------------------------------
    def probe(self, idx: int, layer, hidden) -> Probe | None:
        """The probe layer `idx`'s attention fills (None: it runs as the stock layer)."""
        self.last_probe = None
        found = self._group_of(idx)
        if found is not None:
            self.last_probe = self.plan.step.probe(self, *found, idx, layer, hidden)
        return self.last_probe

    def new_probe(self, mode: str | None) -> Probe:
        """A probe over the scored rows' visual slots; the step adds what its attention kernel reads."""
        vis_idx, vis_ok = self.visual_slots()
        return Probe(mode=mode, rows=self.rows, all_rows=self.all_rows, vis_idx=vis_idx, vis_ok=vis_ok)

    def rater_probe(self, raters: torch.Tensor, width: int | None = None) -> Probe:
        """A probe whose queries are the `raters` (B', S) slots of each scored row, in order (short rows padded,
        marked by rater_ok): their attention over every key they see, read at the visual columns (attn_visual).
        width: the most raters of any row, when the step knows it (else it is read from the device)."""
        if width is None:
            width = int(raters.sum(-1).clamp_min(1).max())
        order = torch.sort((~raters).to(torch.int8), dim=-1, stable=True).indices  # raters first, in order
        probe = self.new_probe("row")
        probe["rater_idx"] = order[:, :width]  # (B', Nt)
        probe["rater_ok"] = torch.arange(width, device=raters.device)[None] < raters.sum(-1)[:, None]  # (B', Nt)
        probe["key_ok"] = self.slot_ok[self.rows]
        return probe

    def pseudo_cls_probe(self, mode: str, layer, hidden) -> Probe:
        """A probe among {visual slots, pseudo-CLS} (eq. 8's query), with its masks: built once per segment (reset
        at each drop, with the slots): which entries are real keys, and the mask of this mode (the fused maps
        take the former, the torch ops the latter)."""
        probe = self.new_probe(mode)
        vis_idx, vis_ok = probe["vis_idx"], probe["vis_ok"]
        if "key_ok" not in self._masks:
            self._masks["key_ok"] = torch.cat([vis_ok, vis_ok.new_ones(vis_ok.shape[0], 1)], dim=1)  # (B', Nv + 1)
        if mode not in self._masks:
            self._masks[mode] = probe_mask(self._masks["key_ok"], mode)
        probe["mask"], probe["pcls_key_ok"] = self._masks[mode], self._masks["key_ok"]
        probe.update(self._pseudo_cls(layer, hidden, self.rows, vis_idx, vis_ok))
        return probe

    def text_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: (B, L) bool over the prompt's positions -> (B', S) the scored rows' slots holding them."""
        return torch.gather(positions[self.rows], 1, self.slot_pos[self.rows]) & self.slot_real[self.rows]

    def visual_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scored rows' visual slots in ascending order (B', Nv), and which are real (B', Nv): short rows end
        in entries marked not ok. Cached until the next drop changes the slots."""
        if self._vis_slots is None:
            vis = self.slot_visual[self.rows]  # (B', S)
            n_vis = vis.sum(-1)  # (B',)
            width = (int(n_vis.max()) if self.known is None
                     else self.per_image[-1] * max(self.images[r] for r in self.row_list))
            vis_idx = torch.sort((~vis).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # (B', Nv)
            self._vis_slots = vis_idx, torch.arange(width, device=vis.device)[None] < n_vis[:, None]
        return self._vis_slots

    def _pseudo_cls(self, layer, hidden, rows, vis_idx, vis_ok) -> dict:
        """Eq. 8 at this layer: mean hidden state of the selected instruction tokens, or the fallback, through the
        layer's own input norm; and the RoPE of the position right after the last visual token. The layer's
        attention projects it with its own q/k weights (GTPLlamaAttention.forward).

        Without a graph: the pseudo-CLS only scores, and its column is cut from the layer's q/k before attention.
        A graph would also tie the layer's inputs to the outer forward, which reentrant checkpointing cannot
        replay (it would run the backward of the outer graph twice)."""
        with torch.profiler.record_function("ivtp.score"), torch.no_grad():
            if self._pcls_slots is None:  # which slots to average and where the pseudo-CLS sits: fixed until a drop
                sel = self.text_slots(self.g.text_select)  # (B', S)
                count = sel.sum(-1, keepdim=True)  # (B', 1)
                last_vis = torch.gather(self.slot_pos[rows], 1, vis_idx).masked_fill(~vis_ok, -1)
                last_vis = last_vis.max(-1).values  # (B',)
                pos = torch.gather(self.full_position_ids[rows], 1, last_vis[:, None]) + 1  # (B', 1)
                rope = self.model.rotary_emb(hidden[:1, :1], position_ids=pos)  # cos, sin: (B', 1, Dh)
                # The cos/sin of the layer's sequence with the pseudo-CLS column appended (rows not scored: zeros).
                sequence = self.position_embeddings if self.pruned else self.full_embeddings  # each (B, S, Dh)
                joint = []
                for seq, pc in zip(sequence, rope):
                    if self.all_rows:
                        joint.append(torch.cat([seq, pc.to(seq.dtype)], dim=1))  # (B, S + 1, Dh)
                    else:
                        col = seq.new_zeros(seq.shape[0], 1, seq.shape[-1])
                        col[rows] = pc.to(seq.dtype)
                        joint.append(torch.cat([seq, col], dim=1))
                self._pcls_slots = (sel[:, None].float() / count.clamp_min(1)[:, :, None],  # (B', 1, S) mean weights
                                    count > 0, self.g.fallback[rows].float(), tuple(joint))
            weights, has_text, fallback, joint_rope = self._pcls_slots
            h = hidden if self.all_rows else hidden[rows]  # (B', S, D)
            mean = torch.bmm(weights, h.float())[:, 0]  # (B', D)
            pcls = torch.where(has_text, mean, fallback).to(hidden.dtype)  # (B', D)
            return {"pcls_x": layer.input_layernorm(pcls[:, None]), "joint_rope": joint_rope}  # (B', 1, D)

    def query_key(self, layer, hidden, positions):
        """A layer's own q and k for tokens outside the sequence: its input norm, projections and RoPE.
        hidden: (B, n, D), positions: (B, n). Returns (B, H, n, Dh) and (B, Hkv, n, Dh)."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        b, n = x.shape[:2]
        q = attn.q_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        return apply_rotary_pos_emb(q, k, *self.model.rotary_emb(x, position_ids=positions))

    # -- pruning ---------------------------------------------------------------------------------------------
    def after_layer(self, idx: int, hidden):
        found = self._group_of(idx)
        return hidden if found is None else self.plan.step.after_layer(self, *found, idx, hidden)

    def drop_visual(self, hidden, probe, keep_vis, idx, per_image: int | None = None):
        """Keep every text and padding token and, of the scored rows' visual slots (probe's vis_idx), those in
        keep_vis (B', Nv). per_image: how many that is per image, when every image keeps the same count (a known
        prefill needs it: the new width is then counted on the host)."""
        keep = torch.zeros_like(self.slot_visual)  # (B, S)
        keep[self.rows] = keep.new_zeros(len(self.rows), keep.shape[1]).scatter_(
            1, probe["vis_idx"], keep_vis & probe["vis_ok"])
        known = None
        if self.known is not None:
            if per_image is None:
                raise RuntimeError(f"{type(self.plan.step).__name__} keeps a count the host cannot know: it cannot "
                                   "run in a compiled prefill")
            dropped = self.per_image[-1] - per_image
            self.row_len = [n - dropped * i for n, i in zip(self.row_len, self.images)]
            self.per_image.append(per_image)
            known = max(self.row_len), not self.known.padded and len(set(self.row_len)) == 1
        return self.keep_visual(hidden, keep, idx, known=known)

    def keep_visual(self, hidden, visual_slots, idx, appended: dict | None = None, known: tuple | None = None):
        """Keep every text and padding token and the visual slots marked in visual_slots (B, S).

        appended: None keeps every survivor's position. Else the sequence is rebuilt and renumbered (drop_slots'
        renumber) with, per row r, the slots appended[r] (merged tokens, in that order) moved right after the
        row's last visual slot, as methods that append their merged tokens to the image do."""
        keep = self.slot_real & ~self.slot_visual | visual_slots
        if appended is None:
            return self.drop_slots(hidden, keep, idx, known=known)
        slots = torch.arange(hidden.shape[1], device=hidden.device)
        order_key = slots.float().repeat(hidden.shape[0], 1)  # (B, S): slot order, then the appended moved
        last_visual = torch.where(self.slot_visual, slots, -1).max(-1).values.tolist()  # (B,)
        for r, moved in appended.items():
            order_key[r, moved] = last_visual[r] + torch.arange(1, len(moved) + 1, device=hidden.device) / (len(moved) + 1)
        return self.drop_slots(hidden, keep, idx, order_key=order_key, renumber=True)

    def current_positions(self) -> torch.Tensor:
        """(B, S) the RoPE position of each slot in the layers now running."""
        return self.position_ids if self.pruned else self.full_position_ids

    def drop_slots(self, hidden, keep, idx, order_key: torch.Tensor | None = None, renumber: bool = False,
                   known: tuple[int, bool] | None = None):
        """Keep the slots in `keep` (B, S); the others leave the sequence here.

        By default the kept slots stay in order and keep their positions. order_key (B, S) float reorders them
        (ascending key; a merged token placed after the ones it follows). renumber: from here on, the slots take
        consecutive positions in their new order (0, 1, ..., as a sequence rebuilt from the survivors would), and
        decode steps in these layers continue from there (DecodeState.positions). known: (width, dense) as the host
        counted them (drop_visual), instead of reading them back."""
        b, s, d = hidden.shape
        # Dropped tokens exit here with their current hidden state; fillers write to the sink at position L.
        if self.exit_hidden is None:
            self.exit_hidden = hidden.new_zeros(b, self.length + 1, d)
        self.exit_hidden = self.exit_hidden.scatter(1, self._sink()[..., None].expand(-1, -1, d), hidden)
        # The new slots: kept ones in order, then fillers, as wide as the longest row. Whether every new slot is a
        # usable key (no fillers, no padding) is read with the width, in the same copy.
        n_keep = keep.sum(-1)  # (B,)
        if known is None:
            fits = (n_keep == n_keep.max()).all() & (self.slot_ok | ~keep).all()
            width, dense = torch.stack([n_keep.max(), fits]).tolist()
        else:
            width, dense = known
        if order_key is None:
            order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # (B, S')
        else:
            key = torch.where(keep, order_key.float(), float("inf"))
            order = torch.sort(key, dim=-1, stable=True).indices[:, :width]  # (B, S')
        kept = torch.gather(keep, 1, order)
        hidden = torch.gather(hidden, 1, order[..., None].expand(-1, -1, d))  # (B, S', D)
        self.slot_pos = torch.gather(self.slot_pos, 1, order)
        self.slot_real = kept
        self.slot_ok = torch.gather(self.slot_ok, 1, order) & kept
        self.slot_visual = torch.gather(self.slot_visual, 1, order) & kept
        self._vis_slots = self._pcls_slots = None
        self._masks = {}
        self.pruned = True
        self.renumbered = self.renumbered or renumber
        # Which input position's id and cos/sin each slot takes: its own, or renumbered, the i-th slot the i-th.
        source = torch.arange(width, device=keep.device)[None].expand(b, -1) if self.renumbered else self.slot_pos
        self.position_ids = torch.gather(self.full_position_ids, 1, source)
        self.position_embeddings = tuple(torch.gather(e, 1, source[..., None].expand(-1, -1, e.shape[-1]))
                                         for e in self.full_embeddings)
        impl = self.model.config._attn_implementation
        keys = _key_width(self.cache, idx + 1, width, width)
        if impl == "sdpa" and dense:
            # No padding and no fillers: kept tokens stay in position order, so the mask would be the plain
            # causal one, and SDPA reads a missing mask as causal (eager would read it as no mask). Its causal
            # kernel skips the masked half: an explicit boolean mask cost 7-18% more per attention call at
            # 166-230 tokens on a CPU.
            self.mask = None
        else:
            causal_by = self.position_ids if self.renumbered else self.slot_pos  # both ascend along the slots
            self.mask = _format_mask(_prefill_mask(causal_by, self.slot_ok), impl, hidden.dtype, keys)
        self.segments.append((idx + 1, self.slot_ok.clone()))
        self.dense.append(bool(dense))
        # A row's survivors hold positions 0..n_keep-1 (fillers after them), so a new token at input position p sits
        # at p - (L - n_keep) in these layers.
        self.shifts.append(self.length - n_keep if self.renumbered else None)
        self.n_visual.append(self.slot_visual.sum(-1))
        return hidden

    def _sink(self) -> torch.Tensor:
        return torch.where(self.slot_real, self.slot_pos, self.length)  # (B, S)

    def finish(self, hidden):
        """Put every kept token's final hidden state back at its position; dropped ones keep their exit state.
        Then fill the trace: the counts in one copy (counted on the host for a known prefill), the positions left
        on the device until asked for."""
        if self.known is None:
            counts = torch.stack(self.n_visual, dim=1).tolist()  # (B, steps + 1)
        else:
            counts = [[n * i for n in self.per_image] for i in self.images]
        trace = self.trace
        trace.counts = [row if self.images[r] else [] for r, row in enumerate(counts)]
        trace.visual = self.g.visual
        if not self.pruned:
            return hidden
        trace.kept = (self.slot_pos, self.slot_visual)
        d = hidden.shape[-1]
        hidden = hidden.to(self.exit_hidden.device)  # the last layer may run on another device (device_map)
        return self.exit_hidden.scatter(1, self._sink()[..., None].expand(-1, -1, d), hidden)[:, : self.length]
