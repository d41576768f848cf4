"""Trained compressors that replace LLaVA-1.5's projector and hand the LLM fewer visual tokens (IVTP's Table 1
peers): Honeybee's C-Abstractor, LLaMA-VID's context and content tokens, Qwen-VL's resampler.

Each is a plain torch module: (B, N_patches, D_vision) CLIP features (layer -2, patches only, as LLaVA feeds its
projector) -> (B, tokens_per_image, D_llm). LLaMA-VID's also takes the instruction's embeddings and their mask.
`attach_projector` puts one into a transformers LLaVA in place (ivtp/projectors/llava.py); docs/methods.md has
the hyper-parameters.
"""

from __future__ import annotations

from torch import nn

from ivtp.errors import InputError
from ivtp.names import PROJECTOR_NAMES
from ivtp.projectors.honeybee import CAbstractor
from ivtp.projectors.llama_vid import LlamaVidProjector
from ivtp.projectors.qwen_vl import QwenVLResampler

# name -> module class; "mlp" (LLaVA's own projector) is the model's stock module and is not built here.
PROJECTORS: dict[str, type[nn.Module]] = {
    "honeybee": CAbstractor,
    "llama_vid": LlamaVidProjector,
    "qwen_vl": QwenVLResampler,
}


class ProjectorError(InputError):
    """An unknown projector name, or options it does not take."""


def check_name(name: str) -> str:
    """`name` if it is a compressor this package builds; else a one-line ProjectorError."""
    if name not in PROJECTORS:
        hint = " (mlp is LLaVA's own projector: nothing to attach)" if name == "mlp" else ""
        raise ProjectorError(f"unknown projector {name!r}{hint}; choose one of {', '.join(PROJECTORS)}")
    return name


def build_projector(name: str, vision_hidden: int, llm_hidden: int, num_tokens: int = 64, num_patches: int = 576,
                    **options) -> nn.Module:
    """A fresh compressor. `num_tokens` is its token budget (LLaMA-VID adds its context token: the module's
    `tokens_per_image` says what it outputs); `options` are the module's own keywords (e.g. honeybee's hidden,
    qwen_vl's width, llama_vid's layers). Bad names, options and geometries raise ProjectorError."""
    cls = PROJECTORS[check_name(name)]
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ProjectorError(f"{name}: num_tokens must be a positive int, got {num_tokens!r}")
    try:
        return cls(vision_hidden, llm_hidden, num_tokens=num_tokens, num_patches=num_patches, **options)
    except TypeError as e:  # an option the module does not take
        raise ProjectorError(f"{name}: {e}") from None
    except ValueError as e:  # a geometry it cannot build (a grid that is not square, heads that do not divide)
        raise ProjectorError(f"{name}: {e}") from None


from ivtp.projectors.llava import (  # noqa: E402  (it builds on the registry above)
    attach_projector,
    image_tokens,
    load_with_projector,
    match_processor,
    projector_spec,
    restore_projector,
)

__all__ = ["PROJECTORS", "PROJECTOR_NAMES", "ProjectorError", "build_projector", "check_name", "attach_projector",
           "image_tokens", "load_with_projector", "match_processor", "projector_spec", "restore_projector"]
