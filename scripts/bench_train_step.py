"""Time one training step (forward and backward) of a bench preset, with the recipe's frozen vision tower and
activation checkpointing, with and without `detach_frozen_tower`, in alternation in one process.

    python scripts/bench_train_step.py [--preset cpu-mid] [--method ivtp|none|...] [--steps 7] [--threads 2]

"none" trains the unpruned model. Random weights, the bench's prompt, the last 8 tokens of each row supervised;
docs/training.md records a run. The loss must come out the same both ways: the frozen tower takes no gradients."""

import argparse
import statistics
import time

import torch

from ivtp.config import PruneConfig
from ivtp.eval.bench import steady_allocator, subjects
from ivtp.training import ModelArguments, detach_frozen_tower, set_trainable


def trainable(model, detach: bool):
    """Instruction tuning's split (projector and LLM train, the tower is frozen), with checkpointing."""
    model = set_trainable(model, ModelArguments(tune="projector+llm")).train()
    model.activation_checkpointing_enable()
    if detach:
        detach_frozen_tower(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-mid")
    ap.add_argument("--method", default="ivtp")
    ap.add_argument("--visual-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    steady_allocator()  # as `ivtp bench` does on a CPU: no page faults from a trimmed heap
    if args.threads:
        torch.set_num_threads(args.threads)
    config = PruneConfig.for_method("topk" if args.method == "none" else args.method, args.visual_tokens)
    models = {}
    for detach in (False, True):  # two copies of the same weights (subjects seeds them alike)
        stock, pruned, inputs = subjects(args.preset, config, batch_size=args.batch_size)
        models[detach] = trainable(stock if args.method == "none" else pruned, detach)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -8:] = inputs["input_ids"][:, -8:]
    times, losses = {False: [], True: []}, {}
    for step in range(args.steps + 1):  # the first step of each warms up
        for detach, model in models.items():
            start = time.perf_counter()
            out = model(**inputs, labels=labels)
            out.loss.backward()
            if step:
                times[detach].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            losses[detach] = float(out.loss)
    for detach in (False, True):
        print(f"{args.preset} {args.method}: {'tower without a graph' if detach else 'tower with a graph   '} "
              f"step {statistics.median(times[detach]):.2f} s (median of {args.steps}), loss {losses[detach]:.6f}")


if __name__ == "__main__":
    main()
