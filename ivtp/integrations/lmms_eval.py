"""lmms-eval plugin: ``lmms-eval --model ivtp_llava --model_args pretrained=...,prune_config=...`` runs any
lmms-eval task on a pruned LLaVA-1.5.

Installed with the ``lmms`` extra (``pip install -e ".[lmms]"``), which registers ``manifest`` below under the
``lmms_eval.models`` entry-point group. lmms-eval 0.7.3 loads that group while ``lmms_eval.models`` is first
imported and wants a ``ModelManifest`` (or a callable returning one; a class would be called as such a factory),
so the entry point names ``manifest``, and the manifest names the class by its import path. The core package never
imports this module.

model_args (``key=value`` pairs, comma-separated):

- ``pretrained``: a preset (``tiny-random``, ``cpu-mid``, ``llava-1.5-7b``, ``llava-1.5-13b``), a llava-hf folder, or
  a hub id already in the HF cache (default ``llava-1.5-7b``).
- ``prune_config``: a prune-config YAML, or ``none`` for the unpruned model (default: ``PruneConfig()``, the
  paper's setting).
- ``method``: a pruning method at its defaults (``ivtp``, ``fastv``, ...), as ``ivtp generate --method``.
- ``device``, ``dtype`` (``float32``, ``bfloat16``, ``float16``), ``attn_implementation``, ``random_weights``.
- ``max_new_tokens``: the answer length when a task's ``generation_kwargs`` give none (default 128).

Batch size comes from lmms-eval's own ``--batch_size`` (an integer; ``auto`` is not supported).

What each request type does:

- ``generate_until``: greedy answers from ``ivtp.inference.generate`` (the vicuna_v1 one-turn prompt, the image
  first), cut at the first of the task's ``until`` strings. Each answer's ``input_tokens`` (in the samples log and
  the results' ``efficiency`` summary) is the length of what the LLM was fed, the image's run shrunk by the
  vision-side pruning, so the saving shows in lmms-eval's own token accounting. ``last_visual_tokens`` keeps,
  for each request of the last call, the visual tokens per image after every pruning step.
- ``loglikelihood``: the summed log-probability of the continuation after the same prompt, from one forward of
  the pruned model; the pruning is guided by the context only, never by the continuation it scores.
- ``generate_until_multi_round``: not supported.

One image per request: LLaVA-1.5 was trained with one, and the pruning is per image. Requests with several
images, videos or audio fail with an error that names the task and document.
"""

from __future__ import annotations

import os

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image

MODEL_NAME = "ivtp_llava"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_MAX_NEW_TOKENS = 128


def manifest():
    """The entry point's payload. lmms-eval calls it from inside the import of ``lmms_eval.models``, so that
    package is imported here, not at the top: a module-level import would, when this module is imported first,
    run the registry while this module is half-initialized and leave ivtp_llava out of it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.IVTPLlava")


class UnsupportedInput(NotImplementedError):
    """A request whose visual input the plugin cannot feed to LLaVA-1.5 (several images, a video, audio)."""


class IVTPLlava(lmms):
    """LLaVA-1.5 with IVTP (or a peer method's) visual-token pruning, as an lmms-eval model."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "llava-1.5-7b",
        prune_config: str | None = None,
        method: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        random_weights: bool = False,
        batch_size: int | str = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_batch_size: int | None = None,  # lmms-eval passes it for 'auto' batch sizes, which are not supported
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"{MODEL_NAME}: unknown model_args {sorted(unknown)}; known: pretrained, prune_config, "
                            "method, device, dtype, attn_implementation, random_weights, max_new_tokens")
        from ivtp.models import DTYPES, load_for_inference, resolve_prune_config

        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{MODEL_NAME}: dtype={dtype!r}; choose one of {', '.join(sorted(DTYPES))}")
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if device is None:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        self.pretrained = str(pretrained)
        # The CLI's loader, so `--model_args` and `ivtp generate` agree on presets, configs and --method.
        self.prune_config = resolve_prune_config(None if prune_config is None else str(prune_config),
                                                 None if method is None else str(method), self.pretrained)
        self.model, self.processor = load_for_inference(self.pretrained, self.prune_config,
                                                        random_weights=bool(random_weights), dtype=dtype,
                                                        device=device, attn_implementation=attn_implementation)
        self.model.eval()
        self._device = torch.device(device)
        self.last_visual_tokens: list[list[int]] = []
        self._warned: set[str] = set()
        eval_logger.info(f"{MODEL_NAME}: {self.pretrained}, pruning "
                         f"{'off' if self.prune_config is None else self.prune_config.method}, steps {self.step_names}")

    # ---- what lmms-eval and callers read -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def state(self):
        """The pruning state (None for ``prune_config=none``)."""
        return getattr(self.model, "ivtp_state", None)

    @property
    def step_names(self) -> list[str]:
        return self.state.step_names() if self.state is not None else ["input"]

    # ---- requests ------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from ivtp.inference import Sample, generate

        out: list[GenerationResult | None] = [None] * len(requests)
        visual_tokens: list[list[int] | None] = [None] * len(requests)
        by_length: dict[int, list[int]] = {}  # one generate call per answer length
        settings = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            settings.append(self._generation_settings(gen_kwargs or {}))
            by_length.setdefault(settings[-1][0], []).append(i)
        for max_new_tokens, indices in by_length.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                samples = []
                for i in chunk:  # images load per chunk: a task's whole image set never sits in memory
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    samples.append(Sample(_question(context), self._one_image(doc_to_visual, doc_id, task, split)))
                results = generate(self.model, self.processor, samples, max_new_tokens=max_new_tokens,
                                   batch_size=len(samples))
                for i, sample, result in zip(chunk, samples, results):
                    text = _cut(result.answer, settings[i][1]).strip()
                    # Output tokens stay unreported: generate returns text, and re-tokenizing it is inexact.
                    out[i] = GenerationResult(text, TokenCounts(input_tokens=self._input_tokens(sample)))
                    visual_tokens[i] = result.visual_tokens
        self.last_visual_tokens = visual_tokens
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        res = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else str(target(self._doc(task, split, doc_id)))
            image = self._one_image(doc_to_visual, doc_id, task, split)
            res.append(self._continuation_logprob(_question(context), continuation, image))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not support generate_until_multi_round tasks; it answers "
                                  "one-turn generate_until and loglikelihood requests")

    # ---- helpers -------------------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict) -> tuple[int, list[str]]:
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"{MODEL_NAME}: generation_kwargs['until'] must be a string or a list, got {until!r}")
        sampling = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0
        if (sampling or int(gen_kwargs.get("num_beams") or 1) > 1) and "greedy" not in self._warned:
            self._warned.add("greedy")
            eval_logger.warning(f"{MODEL_NAME} decodes greedily; the task's sampling/beam settings are ignored")
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), [s for s in until if s]

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _one_image(self, doc_to_visual, doc_id, task, split) -> "Image.Image | str | None":
        """The request's single image (a PIL image or an image file's path), or None for a text-only request."""
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        if visuals is None:
            return None
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        where = f"task {task!r}, doc {doc_id}"
        for v in visuals:
            if isinstance(v, Image.Image):
                continue
            if isinstance(v, str) and v.lower().endswith(IMAGE_EXTENSIONS):
                continue
            kind = "audio" if isinstance(v, dict) else "a video" if isinstance(v, str) else type(v).__name__
            raise UnsupportedInput(f"{MODEL_NAME} takes images only; {where} gives {kind} ({str(v)[:80]!r})")
        if len(visuals) > 1:
            raise UnsupportedInput(f"{MODEL_NAME} takes one image per request (LLaVA-1.5's setting; pruning is per "
                                   f"image); {where} gives {len(visuals)}")
        return visuals[0] if visuals else None

    def _prompt_ids(self, question: str, has_image: bool) -> list[int]:
        """Token ids of the one-turn prompt, with <image> as a single token."""
        from ivtp.data.templates import vicuna_v1_prompt

        return self.tokenizer(vicuna_v1_prompt(question, has_image=has_image)).input_ids

    def _input_tokens(self, sample) -> int:
        """The LLM's input length: the prompt, with the image's run as long as the pruned model feeds it."""
        from ivtp.inference import image_positions

        has_image = sample.image is not None
        size = sample.image.size[::-1] if hasattr(sample.image, "size") else None  # a PIL image: (height, width)
        # The tokenized prompt holds one <image> token; the LLM reads the image's run as the pruned model feeds it.
        visual = image_positions(self.model, size) - 1 if has_image else 0
        return len(self._prompt_ids(sample.prompt, has_image)) + visual

    def _continuation_logprob(self, question: str, continuation: str, image) -> tuple[float, bool]:
        from ivtp.data.templates import vicuna_v1_prompt
        from ivtp.inference import load_image

        has_image = image is not None
        prompt = vicuna_v1_prompt(question, has_image=has_image)
        # The answer follows "ASSISTANT:" after a space, as in training and generation.
        text = prompt + (continuation if continuation[:1].isspace() else " " + continuation)
        full, ctx = self.tokenizer(text).input_ids, self.tokenizer(prompt).input_ids
        common = next((k for k, (a, b) in enumerate(zip(full, ctx)) if a != b), min(len(full), len(ctx)))
        n_cont = len(full) - common  # a token merged across the boundary counts as continuation
        if n_cont <= 0:
            return 0.0, True
        inputs = self.processor(images=[load_image(image)] if has_image else None, text=[text],
                                return_tensors="pt").to(self.device)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        extra = {}
        if has_image:
            extra["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if "image_sizes" in inputs:  # LLaVA-NeXT's
            extra["image_sizes"] = inputs["image_sizes"]
        state = self.state
        if state is not None:
            if has_image:  # shrink here, so the prompt's end is known in the shrunk sequence
                shrunk = self.model.ivtp_shrink(input_ids, extra["pixel_values"], attention_mask, None,
                                                padding_side="right", image_sizes=inputs.get("image_sizes"))
                input_ids, attention_mask = shrunk.input_ids, shrunk.attention_mask
                extra["ivtp_shrunk"] = True
            # The in-LLM stage reads its guidance from the prompt only, not from the continuation it scores.
            extra["ivtp_prompt_len"] = input_ids.shape[1] - n_cont
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
        logprobs = logits[0, -n_cont - 1 : -1].float().log_softmax(-1)  # the positions that predict the continuation
        targets = input_ids[0, -n_cont:]
        total = logprobs.gather(-1, targets[:, None]).sum().item()
        return float(total), bool((logprobs.argmax(-1) == targets).all())


def _question(context: str) -> str:
    """The task's text as the template's question: the template places the image, so a literal <image> goes."""
    from ivtp.data.templates import IMAGE_PLACEHOLDER

    return context.replace(IMAGE_PLACEHOLDER, "").strip() if IMAGE_PLACEHOLDER in context else context


def _cut(text: str, until: list[str]) -> str:
    """`text` up to the earliest of the stop strings."""
    ends = [i for i in (text.find(s) for s in until) if i >= 0]
    return text[: min(ends)] if ends else text


def _batch_size(value) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        if int(value) < 1:
            raise ValueError(f"{MODEL_NAME}: batch_size must be at least 1, got {value}")
        return int(value)
    raise ValueError(f"{MODEL_NAME}: batch_size={value!r}; give an integer (automatic batch sizes are not supported)")
