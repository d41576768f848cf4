"""A compiled pruned prefill: the tower, the guidance and the LLM traced as one graph (`apply_pruning(...,
compile=True)`, `--compile` on the CLI).

Once the prune config and the prompt's length are known, every shape of a pruned prefill is: each stage keeps a
fixed count per image. So the host does what only it can, before the graph:
- it shrinks the `<image>` runs and checks them (ivtp.ops.sequence), and counts the images per row;
- it decodes the instruction and runs CLIP's tokenizer (the CLIP text tower itself runs there too, at a fixed width);
- generate pads the prompt on the left to a multiple of `bucket`, so that prompts of many lengths share few graphs.
Then `prefill` runs the rest as one graph (`fullgraph=True`: a graph break is an error, not a silent fallback) that
reads nothing back from the device (PrefillShape hands the decoder what it would otherwise read). On a GPU, mode
"reduce-overhead" replays it as CUDA graphs. Decode steps stay as generate runs them.

Methods whose in-LLM counts depend on the data (SparseVLM's rank-based budget, VisionDrop's merged tokens) cannot
have a fixed shape; they are refused when the model is prepared (`check_compilable`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from ivtp.config import ConfigError

@dataclass(frozen=True)
class CompileOptions:
    """How the prefill is compiled (not a pruning setting: it changes speed, never the tokens kept)."""

    backend: object = "inductor"  # torch.compile's backend, a name or a callable ("eager": trace only, for checks)
    mode: str | None = None  # torch.compile's mode: "reduce-overhead" replays CUDA graphs on a GPU
    bucket: int = 32  # generate pads prompts on the left to a multiple of this: one graph per bucket

    @classmethod
    def resolve(cls, value) -> "CompileOptions | None":
        """None/False: eager. True: the defaults. A dict or CompileOptions: as given."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"compile: unknown option(s) {sorted(unknown)}; options: "
                                  f"{', '.join(cls.__dataclass_fields__)}")
            options = cls(**value)
            if not isinstance(options.bucket, int) or options.bucket < 1:
                raise ConfigError(f"compile.bucket: a positive number of tokens, got {options.bucket!r}")
            return options
        raise ConfigError(f"compile: expected true, false or a dict of options, got {value!r}")


def check_compilable(config, llm_plan) -> None:
    """Refuse, before the model is changed, a method whose kept counts depend on the data."""
    if llm_plan is not None and not llm_plan.step.known_counts:
        raise ConfigError(f"{config.method}: its in-LLM stage keeps a data-dependent number of tokens, so its "
                          "prefill has no fixed shape to compile; run it without compile")


def bucket_length(length: int, bucket: int) -> int:
    return -(-length // bucket) * bucket


def pad_left(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, to: int, pad_id: int):
    """input_ids (B, L) and its mask, padded on the left to `to` columns (the mask is made if absent)."""
    b, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    extra = to - length
    if extra <= 0:
        return input_ids, attention_mask
    ids = torch.cat([input_ids.new_full((b, extra), pad_id), input_ids], dim=1)
    mask = torch.cat([attention_mask.new_zeros(b, extra), attention_mask], dim=1)
    return ids, mask


class CompiledPrefill:
    """The compiled graph of a pruned model's prefill (one per model: its guards hold the model)."""

    def __init__(self, options: CompileOptions):
        self.options = options
        # Dynamo keeps its graphs, and its limit of 8 recompiles, per code object, and each model is a guard of
        # its own: a code object per model keeps one model's graphs from using up another's limit.
        fn = types.FunctionType(_prefill.__code__.replace(), _prefill.__globals__, _prefill.__name__)
        self.graph = torch.compile(fn, fullgraph=True, dynamic=False, backend=options.backend, mode=options.mode)

    def __call__(self, model, input_ids, pixel_values, attention_mask, position_ids, past_key_values, prompt_len,
                 kwargs: dict):
        """The host's part, then the graph. input_ids hold the shrunk `<image>` runs (checked by the caller)."""
        from ivtp.ops.sequence import placeholder_counts
        from ivtp.patch.llama import PrefillShape

        state = model.ivtp_state
        counts = placeholder_counts(input_ids, state.image_token_id)  # (B,)
        padded = attention_mask is not None and not bool(attention_mask.all())
        shape = PrefillShape(tuple((counts // state.tokens_per_image).tolist()), padded)
        visual = instr = features = weights = instruction = None
        if state.llm_plan is not None:
            width = state.aligner.context_length if state.aligner is not None else None
            visual, instr, instruction = model._guidance_inputs(input_ids, attention_mask, None, prompt_len, width)
            if instruction is not None:
                features, weights = instruction.clip_features, instruction.weights
        out = self.graph(model, input_ids, attention_mask, position_ids, pixel_values, past_key_values, visual, instr,
                         features, weights, shape, prompt_len, kwargs)
        if state.guidance_report is not None:
            state.guidance_report.instruction = instruction  # the report's text, which stayed on the host
        return out


def _prefill(model, input_ids, attention_mask, position_ids, pixel_values, past_key_values, visual, instr,
             clip_features, clip_weights, shape, prompt_len, kwargs):
    """What the graph runs: the stage-1 features, stage 2's guidance and the stock forward with both handed in."""
    from transformers import LlavaForConditionalGeneration

    stock = LlavaForConditionalGeneration.forward
    if visual is None:  # no in-LLM stage: the stock forward, whose get_image_features runs the method's runner
        return stock(model, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                     position_ids=position_ids, past_key_values=past_key_values, **kwargs)
    image_outputs = model.model.get_image_features(pixel_values=pixel_values)
    guidance = model._guidance(input_ids, visual, instr, attention_mask, prompt_len, image_outputs.pooler_output,
                               clip_features=clip_features, clip_weights=clip_weights)
    guidance.shape = shape
    return stock(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 past_key_values=past_key_values, mm_encoder_outputs={"image": image_outputs},
                 ivtp_guidance=guidance, **kwargs)
