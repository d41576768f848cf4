"""How long a LLaVA-NeXT testbed would take to train here: one training step of the shipped testbed's towers as
LLaVA-1.5 (its 112 px scenes, 64 visual tokens) against the same towers as LLaVA-NeXT (224 px scenes on the 2 x 2
grid of 112 px tiles: 5 crops, 336 stock tokens), at the pipeline's pretraining and finetuning lengths, in
alternation in one process. The measured stage times of the fp32 testbed, scaled by the ratios, give the estimate.

    python scripts/testbed_next_estimate.py [--steps 5] [--batch-size 16] [--threads 2]

docs/testbed.md ("A LLaVA-NeXT testbed?") records a run."""

import argparse
import statistics
import time

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from ivtp.data.shapes import draw_scene
from ivtp.data.templates import vicuna_v1_prompt
from ivtp.models import NEXT_GRIDS, build_next_processor, load_model
from ivtp.training import ModelArguments, set_trainable

# The fp32 testbed's stages on this machine (docs/testbed.md, 2026-12-05), seconds.
STAGES = {"data": 20, "clip": 598, "aligner": 240, "pretrain": 860, "finetune": 1684, "ivtp_retrain": 540}
TEXT_TOKENS = {"pretrain": 20, "finetune": 339}  # a caption; a finetuning record's median 403 less its 64 patches


def next_of(model):
    """The testbed's towers and weights as a LLaVA-NeXT (a fresh image_newline, which the step trains)."""
    cfg = model.config
    size = cfg.vision_config.image_size
    config = LlavaNextConfig(
        vision_config=cfg.vision_config, text_config=cfg.text_config, image_token_id=cfg.image_token_id,
        projector_hidden_act=cfg.projector_hidden_act, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, tie_word_embeddings=False,
        image_grid_pinpoints=[[rows * size, cols * size] for rows, cols in NEXT_GRIDS])
    out = LlavaNextForConditionalGeneration(config)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("image_newline" in k for k in missing), (missing, unexpected)
    return out


def batch(processor, size: int, text_tokens: int, n: int):
    words = " ".join(["word"] * text_tokens)
    images = [draw_scene(seed=i, size=size)[0] for i in range(n)]
    inputs = processor(images=images, text=[vicuna_v1_prompt(words)] * n, return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.tokenizer.pad_token_id, -100)
    return inputs


def step(model, inputs) -> float:
    start = time.perf_counter()
    model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    v15, processor = load_model("testbed", dtype=torch.float32)
    nxt = next_of(v15)
    next_processor = build_next_processor(processor.tokenizer, nxt.config)
    models = {name: set_trainable(m, ModelArguments(tune="projector+llm")).train()
              for name, m in (("1.5", v15), ("next", nxt))}
    ratios = {}
    for stage, text in TEXT_TOKENS.items():
        inputs = {"1.5": batch(processor, 112, text, args.batch_size),
                  "next": batch(next_processor, 224, text, args.batch_size)}
        times = {name: [] for name in models}
        for i in range(args.steps + 1):  # the first round warms up
            for name, model in models.items():
                t = step(model, inputs[name])
                if i:
                    times[name].append(t)
        med = {name: statistics.median(t) for name, t in times.items()}
        ratios[stage] = med["next"] / med["1.5"]
        tokens = {name: inputs[name]["input_ids"].shape[1] for name in models}
        print(f"{stage}: sequence {tokens['1.5']} -> {tokens['next']} tokens; step {med['1.5']:.2f} s -> "
              f"{med['next']:.2f} s (x{ratios[stage]:.2f})")
    estimate = (STAGES["data"] + STAGES["clip"] + STAGES["aligner"] + STAGES["pretrain"] * ratios["pretrain"]
                + (STAGES["finetune"] + STAGES["ivtp_retrain"]) * ratios["finetune"])
    print(f"estimated NeXT testbed: {estimate / 60:.0f} min (the 1.5 testbed's stages: "
          f"{sum(STAGES.values()) / 60:.0f} min), before its ablation sweeps")


if __name__ == "__main__":
    main()
