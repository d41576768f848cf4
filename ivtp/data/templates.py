"""LLaVA-1.5 prompt templates (the conversation format its checkpoints were trained on)."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def vicuna_v1_prompt(question: str, has_image: bool = True) -> str:
    """One-turn vicuna_v1 prompt, as LLaVA-1.5's evaluation builds it: the image first, then the question."""
    if IMAGE_PLACEHOLDER in question:
        raise ValueError("the question already contains <image>; pass the bare question")
    user = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question
    return f"{VICUNA_V1_SYSTEM} USER: {user} ASSISTANT:"
