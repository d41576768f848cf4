"""Hooks of the ivtp_tiny_shapes task: each row's image is the seeded synthetic scene."""

from ivtp.data.shapes import draw_scene


def doc_to_visual(doc):
    return [draw_scene(seed=int(doc["seed"]), size=336)[0]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    post = (lmms_eval_specific_kwargs or {}).get("post_prompt", "")
    return f"{doc['question']}{post}"
