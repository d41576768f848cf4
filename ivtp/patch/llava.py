"""`apply_pruning`: turn a stock `transformers.LlavaForConditionalGeneration` into a pruned one, in place.

What changes (class swaps that override methods only; no weight, buffer or state_dict key changes):
- every CLIPAttention of the vision tower gains the GTP probe (ivtp/patch/clip.py);
- `LlavaModel.get_image_features` runs the tower with stage-1 pruning and projects the kept patches;
- with stage 2 on, every LlamaAttention gains its probe and the LlamaModel its pruning decoder loop
  (ivtp/patch/llama.py);
- `LlavaForConditionalGeneration.forward` and `.generate` shrink each image's `<image>` run in input_ids (and the
  attention mask and labels) to the number of tokens stage 1 hands on, before the stock code checks that
  placeholders and features match; with stage 2 on, forward also rates the instruction tokens and hands the
  decoder its guidance. Everything else is the stock model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import LlavaForConditionalGeneration
from transformers.masking_utils import create_masks_for_generate
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ivtp import guidance as gd
from ivtp.aligner import Aligner
from ivtp.compiled import CompiledPrefill, CompileOptions, check_compilable
from ivtp.config import ConfigError, PruneConfig
from ivtp.ops.sequence import (
    PlaceholderError,
    ShrunkBatch,
    check_placeholders,
    infer_padding_side,
    placeholder_counts,
    shrink_placeholders,
)
from ivtp.methods import VisionRunner, build_llm_plan, build_vision_runner
from ivtp.models import MODEL_CLASSES
from ivtp.patch.clip import VisionOutput, patch_attention, tower_patches
from ivtp.patch.probe import profiled
from ivtp.patch.llama import (
    SUPPORTED_ATTENTION,
    LLMGuidance,
    LLMPlan,
    LLMTrace,
    PrunedLlamaModel,
    patch_llama_attention,
)

if TYPE_CHECKING:
    from ivtp.anyres import AnyResLayout

logger = logging.getLogger(__name__)


# ---- the one place that knows where things live in a transformers 5.x LLaVA ---------------------------------
# LLaVA-NeXT shares LLaVA-1.5's module layout (vision_tower, multi_modal_projector, language_model); what differs
# is how an image's crops become its tokens (ivtp/anyres.py, ivtp/patch/llava_next.py).
SUPPORTED_MODELS = tuple(MODEL_CLASSES.values())


def vision_layers(model: LlavaForConditionalGeneration):
    return model.model.vision_tower.encoder.layers


def language_model(model: LlavaForConditionalGeneration):
    return model.model.language_model


def num_patches(config) -> int:
    return tower_patches(config.vision_config)


def pad_token_id(config) -> int:
    for cfg in (config, config.text_config):
        pid = getattr(cfg, "pad_token_id", None)
        if pid is not None:
            return int(pid)
    return 0


# ---- state carried by a pruned model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedLayout:
    """LLaVA-1.5: every image is one crop, `full` placeholders in the prompt and `kept` tokens into the LLM."""

    full: int
    kept: int
    stock = False  # LLaVA-NeXT's layout flags (anyres.AnyResLayout), never set for one fixed view
    variable = False
    per_image = None
    units_are_images = True

    def counts(self, num_images: int, image_sizes=None, handed_on=None) -> tuple[int, int]:
        """(placeholders per image, tokens it hands on); handed_on is for layouts whose counts follow the picks."""
        if image_sizes is not None:
            raise ValueError("image_sizes (any-resolution inputs) are not supported: LLaVA-1.5 uses one fixed size")
        return self.full, self.kept

    def expected(self, image_size=None) -> int:
        return self.kept


@dataclass
class PruningState:
    config: PruneConfig
    num_patches: int
    image_token_id: int
    pad_token_id: int
    vision: VisionRunner  # what runs before the LLM (IVTP's stage 1, a pass-through, or a peer method)
    layout: "FixedLayout | AnyResLayout"  # placeholders written and tokens handed on, per image
    llm_plan: LLMPlan | None = None
    aligner: Aligner | None = None
    # The aligner was handed to apply_pruning (a preset's, or a checkpoint folder's), so config.llm.aligner does
    # not describe it: a checkpoint saved from this model carries it beside the weights.
    aligner_carried: bool = False
    tokenizer: object = None  # the LLM tokenizer, to read instruction tokens as text (guidance 'clip')
    compiled: object = None  # ivtp.compiled.CompiledPrefill: the prefill runs as one compiled graph
    last_vision: VisionOutput | None = None
    last_llm_trace: LLMTrace | None = None
    # LLaVA-NeXT: per image of the last forward, where each token it handed the LLM came from (anyres.stock_places,
    # places_of: crop-major patch indices, -1 for none); None for LLaVA-1.5, whose tokens are one crop's.
    last_image_places: list[torch.Tensor] | None = None
    # LLaVA-NeXT, per image of the last forward: what stage 2 counts its budgets in (its crops, or 1 with
    # `anyres.budget: per_image`), and stage 1's counts after each of its steps, summed over the image's crops.
    last_image_units: list[int] | None = None
    last_image_counts: list[list[int]] | None = None
    # A layout whose counts follow the picks (LLaVA-NeXT's `anyres.layout: stock`): (pixel_values, image features)
    # of a prompt shrunk before its prefill, which the prefill then takes instead of running the tower again.
    pending: tuple | None = None
    guidance_report: gd.GuidanceReport | None = None  # the last prefill's pseudo-CLS selection

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """ivtp_config.json, and the aligner when it is carried (its config then names that file), so the folder
        loads back as it ran (load_pruned, ivtp generate --model folder)."""
        config = self.config
        if self.aligner is not None and self.aligner_carried:
            from ivtp.names import ALIGNER_FILE

            self.aligner.save_pretrained(folder)
            config = PruneConfig.from_dict(config.to_dict())
            config.llm.aligner.model, config.llm.aligner.pretrained = self.aligner.config_name, ALIGNER_FILE
        config.save_pretrained(folder)

    @property
    def last_guidance(self) -> list:
        """Per row of the last prefill: its pseudo-CLS guidance (guidance.RowGuidance); [] for a step that brings
        its own query (FastV, SparseVLM)."""
        return [] if self.guidance_report is None else self.guidance_report.rows()

    @property
    def last_trace(self):
        return None if self.last_vision is None else self.last_vision.trace

    @property
    def tokens_per_image(self) -> int:
        """Tokens each image contributes to the LLM input; for LLaVA-NeXT, each crop (an image hands on one such
        run per crop, and stage 2 counts crops where LLaVA-1.5 counts images), or with `anyres.budget: per_image`
        each image."""
        return self.vision.tokens_per_image

    def units_per_row(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What stage 2 counts its budgets in, per row of a prefill whose visual positions are `visual` (B, L):
        (images per row, or LLaVA-NeXT's crops, (B,) int64; None, or over NeXT's stock layout, whose images hold
        no whole number of crops' tokens, each row's budget multiplier, (B,) float: its visual tokens in crops'
        worth, or with per-image budgets its images)."""
        tokens = visual.sum(1)  # (B,)
        if not (self.layout.stock and self.llm_plan is not None):
            return tokens // self.tokens_per_image, None
        units = torch.zeros_like(tokens)
        per_image = iter(zip((len(p) for p in self.last_image_places), self.last_image_units))
        for r, need in enumerate(tokens.tolist()):  # a row's images are the next ones, until its tokens are filled
            while need > 0:
                n, u = next(per_image)
                need, units[r] = need - n, units[r] + u
        share = units.float() if self.layout.units_are_images else tokens.float() / self.tokens_per_image
        return units, share

    def pending_for(self, pixel_values) -> object | None:
        """The image features computed ahead for exactly these pixels (ivtp_shrink), or None."""
        if self.pending is None or pixel_values is None:
            return None
        pixels, outputs = self.pending
        same = pixels is pixel_values or (pixels.shape == pixel_values.shape
                                          and pixels.data_ptr() == pixel_values.data_ptr())
        return outputs if same else None

    def step_names(self) -> list[str]:
        llm = self.llm_plan.step_names() if self.llm_plan is not None else []
        return ["input"] + self.vision.step_names() + llm

    def llm_tokens_per_layer(self, num_layers: int) -> list[int]:
        """Visual tokens per image in each LLM layer: what a fair comparison of methods that prune at different
        depths averages over (a method that prunes late pays for the layers before)."""
        if self.llm_plan is None:
            return [self.tokens_per_image] * num_layers
        return self.llm_plan.tokens_per_layer(num_layers)

    def row_report(self, row: int, first_image: int, n_images: int) -> dict:
        """What the last prefill did to one row holding images first_image..first_image+n_images-1:
        visual tokens per image after every step of both stages, the original patches of each image that
        survived both, and the pseudo-CLS guidance. On LLaVA-NeXT the patches are crop-major indices
        (crop * patches per crop + patch, crop 0 the base view) and the counts are per image, all its crops."""
        if self.last_image_places is not None:
            return self._anyres_row_report(row, first_image, n_images)
        vision = self.last_vision.trace
        counts = list(vision.counts)
        kept = [vision.kept[first_image + j].tolist() for j in range(n_images)]  # [] for merged tokens
        report = {"stage1_patches": kept}  # what reached the LLM, before its own pruning (`kept` is rebound below)
        ordinal = self._llm_row(row, n_images, counts, report)  # among the row's visual tokens
        if ordinal is not None:
            per_image = self.tokens_per_image
            # Patches map through only when every token the LLM got was one patch (not for merged tokens).
            kept = [[kept[j][i] for i in (ordinal[ordinal // per_image == j] % per_image).tolist()]
                    if len(kept[j]) == per_image else kept[j] for j in range(n_images)]
        return {"visual_tokens": counts, "kept_patches": kept, **report}

    def _anyres_row_report(self, row: int, first_image: int, n_images: int) -> dict:
        places = self.last_image_places[first_image:first_image + n_images]  # per image, in the order handed on
        if self.layout.every_patch:  # in the stock layout, newlines included
            counts = [len(places[0])]
        else:  # per image: stage 1's counts over all its crops (a row's images averaged)
            counts = [sum(c) // n_images for c in zip(*self.last_image_counts[first_image:first_image + n_images])]
            if self.layout.variable:  # what the kept patches came to after the padding cut, with the newlines
                counts[-1] = sum(len(p) for p in places) // n_images
        report = {"stage1_patches": [sorted(p[p >= 0].tolist()) for p in places]}
        ordinal = self._llm_row(row, n_images, counts, report)
        if ordinal is None:
            return {"visual_tokens": counts, "kept_patches": report["stage1_patches"], **report}
        starts = torch.tensor([0] + [len(p) for p in places]).cumsum(0)  # each image's first ordinal in the row
        image = torch.searchsorted(starts, ordinal, right=True) - 1
        kept = [sorted(p[p >= 0].tolist()) for p in (places[j][ordinal[image == j] - starts[j]]
                                                     for j in range(n_images))]
        return {"visual_tokens": counts, "kept_patches": kept, **report}

    def _llm_row(self, row: int, n_images: int, counts: list, report: dict) -> torch.Tensor | None:
        """The LLM stage's part of a row report: its counts per image appended to `counts`, the row's guidance
        added to `report`; returns the ordinals (among the row's visual tokens) the LLM kept, or None."""
        llm = self.last_llm_trace
        if self.llm_plan is None or llm is None:
            return None
        counts += [c // n_images for c in llm.counts[row][1:]]
        if row < len(self.last_guidance):
            report.update(self.last_guidance[row].to_json())
        return torch.searchsorted(llm.visual_positions[row], llm.kept_positions[row]).cpu()

    def shrink(
        self,
        input_ids: torch.Tensor,
        num_images: int,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        padding_side: str,
        already_shrunk: bool = False,
        image_sizes=None,
        handed_on=None,
    ) -> ShrunkBatch:
        """Check the placeholders against the images, then shrink each image's run to the tokens it hands on
        (`layout`; image_sizes: LLaVA-NeXT's (num_images, 2); handed_on: per image, the counts of a layout whose
        counts follow the picks). Input that `shrink` already produced (generate's later calls) must hold the
        shrunk runs, and passes."""
        counts = placeholder_counts(input_ids, self.image_token_id)
        full, kept = self.layout.counts(num_images, image_sizes, handed_on)
        if already_shrunk:
            check_placeholders(counts, num_images, kept)
            return ShrunkBatch(input_ids, attention_mask, labels, None)
        check_placeholders(counts, num_images, full)
        return shrink_placeholders(
            input_ids, self.image_token_id, full, kept,
            attention_mask=attention_mask, labels=labels, pad_token_id=self.pad_token_id, padding_side=padding_side,
        )

    def check_no_placeholders(self, input_ids: torch.Tensor) -> None:
        counts = placeholder_counts(input_ids, self.image_token_id)
        if bool(counts.any()):
            raise PlaceholderError(
                f"the prompt holds <image> placeholders (per row: {counts.tolist()}) but no pixel_values were given"
            )


# ---- the swapped-in classes ---------------------------------------------------------------------------------------
class PrunedLlavaModel:
    """Mixin for LlavaModel: stage-1 pruned image features."""

    ivtp_state: PruningState

    def get_image_features(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None,
        **kwargs,
    ):
        _check_feature_args(self.config, vision_feature_layer, vision_feature_select_strategy)
        state = self.ivtp_state
        if image_sizes is not None:
            state.layout.counts(pixel_values.shape[0], image_sizes)  # refuses them, in the one place that says why
        out = state.vision.run(self.vision_tower, pixel_values, want_final_cls=state.aligner is not None)
        state.last_vision = out
        image_features = self.multi_modal_projector(out.features)  # (B, K, D)
        return BaseModelOutputWithPooling(last_hidden_state=out.features, pooler_output=list(image_features))


class PrunedLlavaForConditionalGeneration:
    """Mixin for LlavaForConditionalGeneration: shrink placeholder runs before the stock forward/generate."""

    ivtp_state: PruningState

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, ivtp_shrunk: bool = False, ivtp_prompt_len=None,
                image_sizes=None, **kwargs):
        """The stock forward, on input_ids whose <image> runs hold one placeholder per patch (as the processor
        writes them); they are shrunk to the tokens stage 1 keeps. `ivtp_shrunk=True` says they already are;
        `ivtp_prompt_len` (set by generate) bounds the instruction that guides stage 2. image_sizes: LLaVA-NeXT's
        (named here, as in the stock signature, so that generate hands it on)."""
        state = self.ivtp_state
        if image_sizes is not None:
            kwargs["image_sizes"] = image_sizes
        if pixel_values is None:
            # Only a prefill can carry placeholders without images. A compiled forward is a decode step (HF never
            # compiles the prefill), where reading the cache length would break the graph.
            if input_ids is not None and not torch.compiler.is_compiling() and _is_prefill(past_key_values):
                state.check_no_placeholders(input_ids)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs)
        if input_ids is None:
            raise ValueError("a pruned LLaVA needs input_ids with pixel_values: the <image> runs are shrunk in input_ids")
        shrunk = self.ivtp_shrink(input_ids, pixel_values, attention_mask, kwargs.get("labels"),
                                  padding_side=infer_padding_side(attention_mask, default="right"),
                                  image_sizes=kwargs.get("image_sizes"), already_shrunk=ivtp_shrunk)
        ahead = state.pending_for(pixel_values)  # the tower already ran for a layout that follows the picks
        if not ivtp_shrunk:  # a forward of its own: nothing else waits for these features
            state.pending = None
        if shrunk.keep is not None:
            input_ids, attention_mask = shrunk.input_ids, shrunk.attention_mask
            if kwargs.get("labels") is not None:
                kwargs["labels"] = shrunk.labels
            if position_ids is not None:  # given for the full-length sequence: rebuild for the shrunk one
                position_ids = None if attention_mask is None else _positions_from_mask(attention_mask)
        if (state.compiled is not None and _is_prefill(past_key_values) and kwargs.get("labels") is None
                and not self.training and inputs_embeds is None):
            return state.compiled(self, input_ids, pixel_values, attention_mask, position_ids, past_key_values,
                                  ivtp_prompt_len, kwargs)
        if state.llm_plan is None or not _is_prefill(past_key_values):
            images = {"pixel_values": pixel_values} if ahead is None else {"mm_encoder_outputs": {"image": ahead}}
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, **images, **kwargs)
        # Stage 2: the instruction's CLIP side (it needs no image: on a GPU its host work, decoding and
        # tokenising, then overlaps the tower's kernels instead of leaving the GPU idle after them), the image
        # features, the guidance built from both, then the stock forward with the features handed in
        # (mm_encoder_outputs) so the tower runs once.
        visual, instr, instruction = self._guidance_inputs(input_ids, attention_mask, kwargs.get("labels"),
                                                           ivtp_prompt_len)
        image_outputs = ahead or self.model.get_image_features(pixel_values=pixel_values, **_image_kwargs(kwargs))
        guidance = self._guidance(input_ids, visual, instr, attention_mask, ivtp_prompt_len,
                                  image_outputs.pooler_output, instruction)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                               mm_encoder_outputs={"image": image_outputs}, ivtp_guidance=guidance, **kwargs)

    def ivtp_shrink(self, input_ids, pixel_values, attention_mask=None, labels=None, padding_side: str = "left",
                    image_sizes=None, already_shrunk: bool = False) -> ShrunkBatch:
        """Shrink the prompt's <image> runs to what each image hands the LLM (PruningState.shrink). A layout whose
        counts follow the picks (LLaVA-NeXT's `anyres.layout: stock`) runs the tower first; its features wait
        (PruningState.pending) for the prefill of the same pixels, so the tower runs once."""
        state = self.ivtp_state
        handed_on = None
        if state.layout.variable:
            # Input shrunk earlier (generate's prefill, and each step of generate without a cache) takes the
            # features computed then; fresh input runs the tower now.
            outputs = state.pending_for(pixel_values) if already_shrunk else None
            if outputs is None and already_shrunk:
                raise ValueError("this prompt's <image> runs were shrunk for a layout whose counts follow the picks "
                                 "(anyres.layout: stock) without its features: shrink with model.ivtp_shrink and "
                                 "pass the same pixel_values")
            if outputs is None:
                outputs = self.model.get_image_features(pixel_values=pixel_values,
                                                        **_image_kwargs({"image_sizes": image_sizes}))
                state.pending = (pixel_values, outputs)
            handed_on = [len(f) for f in outputs.pooler_output]
        return state.shrink(input_ids, pixel_values.shape[0], attention_mask, labels, padding_side=padding_side,
                            already_shrunk=already_shrunk, image_sizes=image_sizes, handed_on=handed_on)

    def _guidance_inputs(self, input_ids, attention_mask, labels, prompt_len, clip_width: int | None = None):
        """What the guidance needs before the tower runs: the placeholders and the instruction, (B, L) bool each,
        and for CLIP guidance the instruction's CLIP side (clip_width: its fixed width in a compiled prefill)."""
        state = self.ivtp_state
        with torch.profiler.record_function("ivtp.guidance"):  # priced as scoring by `ivtp bench`
            visual = input_ids == state.image_token_id  # (B, L)
            instr = gd.instruction_mask(visual, attention_mask, labels, prompt_len)  # (B, L)
        instruction = None
        if state.aligner is not None:  # apply_pruning keeps one exactly when the guidance is CLIP's
            instruction = self._instruction_text(input_ids, instr, clip_width)
        return visual, instr, instruction

    @profiled("ivtp.guidance")  # `ivtp bench` prices this range as scoring, like _guidance
    def _instruction_text(self, input_ids, instr, width: int | None = None) -> gd.InstructionText:
        """The image-independent half of IVTP's CLIP guidance (gd.prepare_clip). instr: (B, L) bool; width: CLIP
        tokens per row (a compiled prefill's fixed shape), else as the longest instruction needs."""
        state = self.ivtp_state
        if state.aligner.visual_proj.device != input_ids.device:  # model.to() does not reach it
            state.aligner.to(input_ids.device)  # (a no-op .to() still walks every parameter: ~1 ms for ViT-L's)
        stage = state.config.llm
        phrases = stage.template_phrases if stage.instruction == "question" else ()
        return gd.prepare_clip(state.aligner, state.tokenizer, input_ids, instr, phrases, width)

    @profiled("ivtp.guidance")  # `ivtp bench` prices this range (the aligner) as scoring
    def _guidance(self, input_ids, visual, instr, attention_mask, prompt_len, image_features,
                  instruction: gd.InstructionText | None = None, clip_features=None, clip_weights=None) -> LLMGuidance:
        """Eq. 8's ingredients for each row: visual positions, selected instruction tokens, the fallback.
        visual, instr: (B, L) bool, the placeholders and the instruction (gd.instruction_mask). CLIP guidance
        reads `instruction`'s features and overlap weights (clip_features, clip_weights: those tensors, given
        apart when the InstructionText stays outside a compiled graph)."""
        state = self.ivtp_state
        stage = state.config.llm
        vision = state.last_vision
        images, units = state.units_per_row(visual)  # (B,) images (crops), and NeXT's stock share or None
        own = state.llm_plan.step.guidance(self.get_input_embeddings(), input_ids, visual, instr, images,
                                           attention_mask, prompt_len, image_features)
        if own is not None:  # the step's own (FastV's query, SparseVLM's raters): no pseudo-CLS to report
            state.guidance_report = None
            own.units = units
            return own
        if instruction is not None:
            clip_features, clip_weights = instruction.clip_features, instruction.weights
        row_of_image = torch.repeat_interleave(torch.arange(len(images), device=images.device), images)  # (n_img,)

        def per_row(x):  # (n_img, D) -> (B, D): the mean over each row's images (zeros for text-only rows)
            out = x.new_zeros(len(images), x.shape[-1]).index_add_(0, row_of_image, x)
            return out / images.clamp_min(1)[:, None].to(x.dtype)

        fallback = per_row(self.model.multi_modal_projector(vision.cls_feature))  # (B, D)
        relevance = torch.full(visual.shape, torch.nan, device=visual.device)  # (B, L): nothing rated
        if stage.guidance == "random":  # the control: a fixed random direction at the fallback's norm
            gen = torch.Generator().manual_seed(0)
            noise = torch.randn(fallback.shape[-1], generator=gen).to(fallback.device, fallback.dtype)
            fallback = noise[None] * (fallback.norm(dim=-1, keepdim=True) / noise.norm())
        elif stage.guidance == "all_text":
            relevance = torch.where(instr, 1.0, relevance)
        elif stage.guidance == "llm_threshold":
            relevance = gd.rate_by_embedding(self.get_input_embeddings()(input_ids), instr, fallback)
        elif stage.guidance == "clip":  # the text side was prepared before the tower ran (_instruction_text)
            rated = gd.rate_clip(state.aligner, clip_features, clip_weights, per_row(vision.cls_final))
            relevance = gd.standardise(rated, stage.relevance)
        tau = -1.0 if stage.guidance == "all_text" else stage.tau
        select = relevance >= tau  # (B, L): nan (not rated) never passes
        state.guidance_report = gd.GuidanceReport(relevance, select, instr, instruction)
        return LLMGuidance(visual=visual, images=images, text_select=select, fallback=fallback, units=units)

    def generate(self, inputs=None, ivtp_shrunk: bool = False, **kwargs):
        """Stock generate, after shrinking the prompt's <image> runs once (unless `ivtp_shrunk`); every forward
        it makes is told so. The returned sequences start with the shrunk prompt."""
        input_ids = kwargs.pop("input_ids", inputs)
        pixel_values = kwargs.get("pixel_values")
        state = self.ivtp_state
        if input_ids is not None and pixel_values is not None:
            attention_mask = kwargs.get("attention_mask")
            shrunk = self.ivtp_shrink(input_ids, pixel_values, attention_mask, None,
                                      padding_side=infer_padding_side(attention_mask, default="left"),
                                      image_sizes=kwargs.get("image_sizes"), already_shrunk=ivtp_shrunk)
            _shift_length_limits(kwargs, input_ids.shape[1] - shrunk.input_ids.shape[1])
            input_ids = shrunk.input_ids
            if shrunk.attention_mask is not None:
                kwargs["attention_mask"] = shrunk.attention_mask
        elif input_ids is not None:
            state.check_no_placeholders(input_ids)
        added = 0  # left padding to the compiled prefill's bucket, cut from the sequences returned
        if state.compiled is not None and input_ids is not None and pixel_values is not None:
            from ivtp.compiled import bucket_length, pad_left

            length = bucket_length(input_ids.shape[1], state.compiled.options.bucket)
            added = length - input_ids.shape[1]
            input_ids, kwargs["attention_mask"] = pad_left(input_ids, kwargs.get("attention_mask"), length,
                                                           state.pad_token_id)
            _shift_length_limits(kwargs, -added)
        if state.llm_plan is not None:
            gen_cfg = kwargs.get("generation_config") or self.generation_config
            if (kwargs.get("num_beams") or gen_cfg.num_beams or 1) > 1:
                raise ValueError("beam search is not supported with the in-LLM stage: the pruned KV cache is not "
                                 "reordered between beams; use greedy or sampling")
            if input_ids is not None:
                kwargs["ivtp_prompt_len"] = input_ids.shape[1]
            # With a static cache, generate compiles the decode step on a GPU by itself (CUDA graphs). The pruned
            # decoder traces as one full graph (tested on a CPU), but the compiled path has not run on a GPU yet,
            # so it stays eager unless the caller passes disable_compile=False.
            kwargs.setdefault("disable_compile", True)
        try:
            out = super().generate(input_ids, ivtp_shrunk=True, **kwargs)
        finally:
            state.pending = None  # the features computed ahead were for this prompt only
        if added:
            if isinstance(out, torch.Tensor):
                return out[:, added:]
            out.sequences = out.sequences[:, added:]
        return out

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, past_key_values, position_ids=None,
                                  **kwargs):
        """generate() builds the masks of each step ahead of the forward when the cache is static, so that a
        compiled decoder gets them at a fixed shape. Three cases:
        - the prefill of a model with an in-LLM stage keeps the 2-D padding mask: the pruned layers build their
          own masks from it;
        - a decode step after a pruned prefill gets the stock layers' mask and one per pruned segment
          (DecodeState.premade_masks), in a dict the decoder reads (PrunedLlamaModel.forward);
        - everything else gets the stock masks, as an unpruned model does."""
        past_len = int(past_key_values.get_seq_length()) if past_key_values is not None else 0  # outside the graph
        two_d = attention_mask is None or attention_mask.ndim == 2  # padding only (or none), not 4-D masks
        if past_len == 0 and two_d and self.ivtp_state.llm_plan is not None:
            return attention_mask
        stock = create_masks_for_generate(config, inputs_embeds, attention_mask, past_key_values, position_ids,
                                          **kwargs)
        decode = getattr(past_key_values, "ivtp_decode", None)
        if decode is None or past_len == 0 or not two_d:
            return stock
        impl = self.config.get_text_config()._attn_implementation
        return decode.premade_masks(stock, attention_mask, past_len, inputs_embeds.shape[1], past_key_values, impl,
                                    inputs_embeds.dtype)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Weights in the llava-hf layout, with ivtp_config.json beside them."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.ivtp_state.save_pretrained(save_directory)
        return out


def _shift_length_limits(kwargs: dict, removed: int) -> None:
    """max_length and min_length count the prompt, and the shrunk prompt is `removed` tokens shorter than the one
    the caller built: left as given, a limit would grant that many more new tokens than the stock model gets.
    Shift the limits passed as arguments (not the model's defaults); max_new_tokens needs nothing."""
    cfg = kwargs.get("generation_config")
    if not removed or kwargs.get("max_new_tokens") is not None or getattr(cfg, "max_new_tokens", None) is not None:
        return
    for name in ("max_length", "min_length"):
        if kwargs.get(name) is not None:
            kwargs[name] = max(0, kwargs[name] - removed)


def _image_kwargs(kwargs: dict) -> dict:
    """What get_image_features needs besides the pixels: LLaVA-NeXT's image_sizes (its crops per image)."""
    return {} if kwargs.get("image_sizes") is None else {"image_sizes": kwargs["image_sizes"]}


def _positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _is_prefill(past_key_values) -> bool:
    return past_key_values is None or past_key_values.get_seq_length() == 0


def _check_feature_args(config, layer, strategy) -> None:
    if layer is not None and layer != config.vision_feature_layer:
        raise ValueError(
            f"this model was pruned for vision_feature_layer={config.vision_feature_layer}; got {layer} in the call"
        )
    if strategy is not None and strategy != config.vision_feature_select_strategy:
        raise ValueError(
            f"this model was pruned for vision_feature_select_strategy={config.vision_feature_select_strategy!r}; "
            f"got {strategy!r} in the call"
        )


def _swap_class(module: torch.nn.Module, mixin: type) -> None:
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    base = module.__class__
    recordable = _CAN_RECORD_REGISTRY.get(module)
    # Keep the stock class name (save_pretrained writes it into config.json "architectures") and its module:
    # transformers then saves with the class's key mapping, in llava-hf's layout. A class it counts as custom code,
    # by its module, would be saved in its internal layout, which other llava-hf tooling cannot read.
    module.__class__ = type(base.__name__, (mixin, base), {"__module__": base.__module__})
    if recordable:  # output_hidden_states / output_attentions hooks are registered per class
        _CAN_RECORD_REGISTRY[module] = recordable


def apply_pruning(model: LlavaForConditionalGeneration, config=None, aligner: Aligner | None = None,
                  tokenizer=None, compile=None) -> LlavaForConditionalGeneration:
    """Apply a prune config to a LLaVA model in place and return it.

    `config` is a PruneConfig, a dict, a YAML/JSON path or a checkpoint folder holding ivtp_config.json.
    Stage 2 with CLIP guidance needs the LLM `tokenizer` (to read instruction tokens as text) and an `aligner`,
    built from `config.llm.aligner` when not given. `compile` (True, or ivtp.compiled.CompileOptions or its dict)
    runs each inference prefill as one compiled graph (ivtp/compiled.py). Refuses a model that is already pruned;
    every check runs before anything is changed.
    """
    if not isinstance(model, SUPPORTED_MODELS):
        raise TypeError(f"apply_pruning expects a transformers "
                        f"{' or '.join(cls.__name__ for cls in SUPPORTED_MODELS)}, got {type(model).__name__}")
    if isinstance(model, PrunedLlavaForConditionalGeneration) or hasattr(model, "ivtp_state"):
        raise RuntimeError("apply_pruning was already applied to this model; load a fresh model to change the config")
    if getattr(model.config, "ivtp_projector", None) is not None:  # ivtp.projectors.CONFIG_KEY
        raise ConfigError(f"this model's projector is the trained compressor {model.config.ivtp_projector['name']!r}"
                          ", which already sets its visual tokens; pruning does not combine with it")
    cfg = PruneConfig.load(config)
    mc = model.config
    if not isinstance(mc.vision_feature_layer, int):
        raise ConfigError(f"multi-layer vision features ({mc.vision_feature_layer}) are not supported")
    if mc.vision_feature_select_strategy != "default":
        raise ConfigError(
            f"vision_feature_select_strategy {mc.vision_feature_select_strategy!r} is not supported: LLaVA-1.5 "
            "drops [CLS] ('default'), and the budgets count patch tokens"
        )
    patches = num_patches(mc)
    layers = vision_layers(model)
    runner, llm_plan = make_plans(cfg, mc)
    options = CompileOptions.resolve(compile)
    if options is not None:
        check_compilable(cfg, llm_plan)
    layout, model_mixin = _model_family(model, cfg, runner, llm_plan, options)
    if llm_plan is not None:
        impl = mc.text_config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ConfigError(f"{cfg.method}: the in-LLM stage runs with {' or '.join(SUPPORTED_ATTENTION)} "
                              f"attention; this model uses {impl!r}")
    carried = aligner is not None
    if cfg.needs_aligner:
        aligner = _checked_aligner(aligner, cfg, mc, tokenizer)
    for layer in layers:
        patch_attention(layer.self_attn)
    state = PruningState(cfg, patches, int(mc.image_token_id), pad_token_id(mc), runner, layout, llm_plan,
                         aligner if cfg.needs_aligner else None, carried and cfg.needs_aligner, tokenizer)
    if options is not None:
        state.compiled = CompiledPrefill(options)
    if llm_plan is not None:
        lm = language_model(model)
        for layer in lm.layers:
            patch_llama_attention(layer.self_attn)
        _swap_class(lm, PrunedLlamaModel)
        lm.ivtp_llm_plan = llm_plan
        lm.ivtp_state = state
    _swap_class(model.model, model_mixin)
    _swap_class(model, PrunedLlavaForConditionalGeneration)
    model.ivtp_state = state
    model.model.ivtp_state = state
    logger.info("IVTP pruning applied: %s", cfg.to_dict())
    return model


def _model_family(model, cfg: PruneConfig, runner: VisionRunner, llm_plan, compile_options):
    """(the layout of each image's tokens, the mixin of the inner model) for LLaVA-1.5 or LLaVA-NeXT; raises
    ConfigError for what NeXT does not run (every check before anything changes)."""
    layout = image_layout(cfg, model.config, runner, llm_plan)
    if isinstance(layout, FixedLayout):
        return layout, PrunedLlavaModel
    from ivtp.patch.llava_next import PrunedLlavaNextModel

    if compile_options is not None:
        raise ConfigError("compile: the compiled prefill is LLaVA-1.5's; LLaVA-NeXT runs eagerly")
    return layout, PrunedLlavaNextModel


def image_layout(cfg: PruneConfig, llava_config, runner: VisionRunner, llm_plan) -> "FixedLayout | AnyResLayout":
    """What each image writes in the prompt and hands the LLM, from the config alone (`ivtp flops` prices it)."""
    from ivtp.anyres import AnyResLayout, is_anyres
    from ivtp.methods.base import PerImageRunner

    if not is_anyres(llava_config):
        return FixedLayout(num_patches(llava_config), runner.tokens_per_image)
    # Nothing pruned per crop before the LLM: the stock layout (padding cut, newlines) stands, and an in-LLM stage
    # keeps its per-crop budget's share of each image's tokens (LLMGuidance.units; docs/paper.md, LLaVA-NeXT), or
    # with per-image budgets its count per image.
    # Pruned per crop: the survivors' layout, or VisPruner's stock layout of the kept patches (`anyres.layout`).
    chosen_stock = cfg.anyres_layout == "stock"
    per_image = runner.tokens_per_image if isinstance(runner, PerImageRunner) else None
    return AnyResLayout(llava_config, runner.tokens_per_image, stock=not runner.prunes or chosen_stock,
                        variable=runner.prunes and chosen_stock, per_image=per_image,
                        units_are_images=cfg.anyres.budget == "per_image")


def make_plans(cfg: PruneConfig, llava_config) -> tuple[VisionRunner, LLMPlan | None]:
    """What runs before the LLM and what prunes inside it, resolved against a model's config alone (no weights:
    `ivtp flops` prices a config this way). Raises ConfigError for budgets the model cannot meet."""
    from ivtp.anyres import is_anyres

    layers = llava_config.text_config.num_hidden_layers
    if is_anyres(llava_config) and cfg.anyres.budget == "per_image":
        runner, tokens_in = _per_image_plans(cfg, llava_config)
    else:
        runner = build_vision_runner(cfg, llava_config.vision_config, llava_config.vision_feature_layer)
        tokens_in = runner.tokens_per_image
    return runner, build_llm_plan(cfg, layers, tokens_in)


def _per_image_plans(cfg: PruneConfig, llava_config) -> tuple[VisionRunner, int]:
    """LLaVA-NeXT with `anyres.budget: per_image`: (the runner, the visual tokens per image the LLM stage is fed,
    at most). Stage 1's count is split over each image's crops (anyres.split_budget); the method's runner is built
    at every count a crop can get, so a budget some crop cannot meet is refused before any compute."""
    from ivtp import anyres
    from ivtp.methods.base import PerImageRunner

    vision, feature_layer = llava_config.vision_config, llava_config.vision_feature_layer
    key = cfg.stage1_budget()
    if key is None:  # nothing prunes before the LLM: its stage keeps a count of each image's stock tokens
        shares = [name for name, value in cfg.llm_budgets() if isinstance(value, float)]
        if shares:
            raise ConfigError(f"anyres.budget per_image: {', '.join(shares)} is a share of the image's tokens, the "
                              f"same per crop and per image; per_image takes a count")
        return (build_vision_runner(cfg, vision, feature_layer), anyres.most_stock_tokens(llava_config))
    name = f"{key[0]}.{key[1]}"
    total = getattr(getattr(cfg, key[0]), key[1])
    if isinstance(total, float):
        raise ConfigError(f"anyres.budget per_image: {name} {total} is a share of each crop's patches, the same per "
                          f"crop and per image; per_image takes a count")
    crops = anyres.crop_count_range(llava_config)
    patches = anyres.side(llava_config) ** 2
    if not max(crops) <= total <= patches * min(crops):
        raise ConfigError(f"anyres.budget per_image: {name} {total} must lie between {max(crops)} (a token for "
                          f"each crop of a {max(crops)}-crop image) and {patches * min(crops)} (every patch of a "
                          f"{min(crops)}-crop image)")
    runners = {}
    for count in sorted({b for n in crops for b in anyres.split_budget(total, n)}):
        try:
            runners[count] = build_vision_runner(cfg.with_stage1_count(count), vision, feature_layer)
        except ConfigError as e:
            raise ConfigError(f"anyres.budget per_image: {name} {total} gives some crop {count} tokens: {e}") from None
    return PerImageRunner(runners, total), total


def _checked_aligner(aligner, cfg: PruneConfig, mc, tokenizer) -> Aligner:
    if tokenizer is None:
        raise ValueError("llm.guidance 'clip' reads the instruction as text: pass the LLM tokenizer, "
                         "apply_pruning(model, config, tokenizer=processor.tokenizer)")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id != mc.image_token_id or len(tokenizer) > mc.text_config.vocab_size:
        raise ValueError(f"tokenizer mismatch: its <image> id is {image_id} and it has {len(tokenizer)} tokens; "
                         f"the model's image_token_id is {mc.image_token_id} and its vocabulary "
                         f"{mc.text_config.vocab_size}")
    if aligner is None:
        aligner = Aligner.from_config(cfg.llm.aligner)
    if aligner.vision_width != mc.vision_config.hidden_size:
        raise ConfigError(f"llm.aligner: its visual projection takes width {aligner.vision_width}, but the vision "
                          f"tower is {mc.vision_config.hidden_size} wide: the aligner must match the tower")
    return aligner


def load_pruned(path: str | os.PathLike, config=None, tokenizer=None, aligner: Aligner | None = None,
                compile=None, **load_kwargs) -> LlavaForConditionalGeneration:
    """Load a llava-hf checkpoint and apply the config saved beside it (or the one given). Stage 2's tokenizer
    defaults to the one saved in the checkpoint folder. `compile`: as for apply_pruning."""
    from ivtp.models import check_llava_folder, model_class

    if os.path.isdir(path):
        check_llava_folder(str(path))  # e.g. LoRA adapters, which transformers would try to complete from the hub
    from ivtp.projectors import load_with_projector, projector_spec

    cls = model_class(str(path), load_kwargs.get("cache_dir"))  # LLaVA-1.5's or LLaVA-NeXT's
    model = load_with_projector(lambda **extra: cls.from_pretrained(path, **load_kwargs, **extra),
                                str(path), load_kwargs.get("cache_dir"))
    if projector_spec(model.config) is not None and config is None and not os.path.isfile(
            os.path.join(path, "ivtp_config.json")):
        return model  # a trained compressor is the model's token reduction: nothing to prune
    if config is None and os.path.isfile(os.path.join(path, "ivtp_config.json")):
        config = path
    cfg = PruneConfig.load(config)
    if tokenizer is None and cfg.needs_aligner:  # only when stage 2 runs with CLIP guidance
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    if aligner is None and cfg.needs_aligner:  # the aligner the folder carries, if any (PruningState.save_pretrained)
        from ivtp.models import preset_aligner

        aligner = preset_aligner(str(path))
    return apply_pruning(model, cfg, aligner=aligner, tokenizer=tokenizer, compile=compile)
