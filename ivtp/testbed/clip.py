"""The testbed's tiny CLIP: trained contrastively on the shapes captions, then exported twice.

- `build_clip`: the open_clip model of the shipped config `ivtp-testbed-clip` (112 px, patch 14: 64 patches; a
  7-layer ViT 192 wide, so LLaVA's feature layer -2 leaves 6 layers for group-wise pruning; a 4-layer text tower
  128 wide with a context of 32; a joint space of 128).
- `train_clip`: open_clip's `ClipLoss` with a learnable logit scale, AdamW with linear warmup and cosine decay, on
  the `filepath<TAB>title` file that `ivtp.data.shapes.generate_testbed` writes. The last rows are held out and
  scored: image->text and text->image top-1 retrieval, and the token-level relevance that IVTP relies on (the
  aligner's per-token joint-space cosine of "a red" at "red" to the image, present vs absent colours, as an AUC).
- `export_vision_tower`: an HF `CLIPVisionModel` folder (plus its `CLIPImageProcessor`) holding exactly the open_clip
  visual tower's weights, for LLaVA (`ivtp.training.build_from_parts`).
- `export_aligner`: a small fp16 safetensors file with the text tower and `visual.proj`, which
  `ivtp.aligner.Aligner.from_config(AlignerConfig(model="ivtp-testbed-clip", pretrained=path))` loads.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ivtp.aligner import text_state_dict  # noqa: F401 (the testbed's tests import it from here too)

MODEL_NAME = "ivtp-testbed-clip"
_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "open_clip",
                       f"{MODEL_NAME}.json")
ROWS_KEY, IDS_KEY = "token_embedding.rows", "token_embedding.ids"  # the aligner file's partial embedding table


def _register() -> None:
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG)


def build_clip(seed: int = 0) -> nn.Module:
    """The testbed CLIP (open_clip `CLIP`, fp32, train mode) with seeded random weights."""
    import open_clip

    _register()
    torch.manual_seed(seed)
    return open_clip.create_model(MODEL_NAME, pretrained=None)


def get_tokenizer():
    """open_clip's BPE tokenizer with the config's context length (32)."""
    import open_clip

    _register()
    return open_clip.get_tokenizer(MODEL_NAME)


# ---- data ------------------------------------------------------------------------------------------------------
def read_tsv(path: str) -> list[tuple[str, str]]:
    """(image path, caption) rows of a `filepath<TAB>title` file; relative paths are taken from the file's folder."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if reader.fieldnames is None or not {"filepath", "title"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns filepath and title, found {reader.fieldnames}")
        return [(os.path.join(base, r["filepath"]), r["title"]) for r in reader]


def load_images(paths: list[str], size: int, progress: bool = False) -> torch.Tensor:
    """uint8 (N, 3, size, size): RGB, shortest side resized to `size` (bicubic) and centre-cropped when needed,
    as the exported `CLIPImageProcessor` does. About 37 KB per 112 px image in memory."""
    from PIL import Image
    from tqdm import tqdm

    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc="loading images", disable=not progress, leave=False)):
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                w, h = im.size
                scale = size / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
                left, top = (im.width - size) // 2, (im.height - size) // 2
                im = im.crop((left, top, left + size, top + size))
            out[i] = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    return out


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, scaled to [0, 1] and normalised with OpenAI CLIP's mean and std."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


# ---- training --------------------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no decay for gains, biases, 1-d parameters and the logit scale."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (rest if excluded else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int):
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def train_clip(tsv: str, out_dir: str, *, epochs: float | None = None, steps: int | None = None,
               batch_size: int = 64, lr: float = 5e-4, weight_decay: float = 0.1, warmup: float = 0.05,
               eval_rows: int = 256, seed: int = 0, threads: int | None = None, precision: str = "fp32",
               regions: list[list[tuple]] | None = None, region_weight: float | tuple[float, ...] = 0.0,
               progress: bool = True) -> tuple[nn.Module, dict]:
    """Train the testbed CLIP on `tsv` and return (model in eval mode, metrics); metrics.json goes to out_dir.

    regions / region_weight: an optional auxiliary loss that makes the tower's patch features name what lies
    under them. `regions[i]` lists, for TSV row i, its objects as (labels, patch indices), labels a class or a
    tuple of classes (one per label set, e.g. shape and position); a linear head (trained, never exported)
    classifies each object from the mean of its patches at the feature layer LLaVA reads (-2), and the sum over
    label sets of `region_weight` (one weight for all, or a tuple with one per set) times their cross-entropy
    joins the contrastive loss. The testbed needs it: its captions can be told apart by colour alone, so
    contrastive training alone leaves shape out of the tower, and position is too faint there for the LLaVA
    built on it to read (docs/testbed.md).

    Length: `steps` optimiser steps, or `epochs` passes over the training rows (default 1 epoch); give one. Batches
    are drawn without replacement from a seeded permutation per epoch (the last partial batch of an epoch is
    dropped). Schedule: AdamW (betas 0.9/0.98, eps 1e-6, decay on matrices only), linear warmup over a `warmup`
    fraction of the steps, then cosine to 0; the logit scale is clamped to at most 100 as open_clip does.

    Batch 64 at 5e-4 by default: on this 7-layer ViT, batch 256 at 1e-3 (and 128 at 2e-3) collapsed to the chance
    loss log(batch) for the first tens of steps, which a CPU budget of a few hundred steps cannot afford; at equal
    images seen (10k), batch 64 / 5e-4 never collapsed and reached 10% image->text top-1 where 128 / 1e-3 had 2%.

    The last `eval_rows` rows (at most a quarter of the file) are held out; see `evaluate_clip` for the metrics.
    Images are loaded into memory once (uint8). Seeded; on CPU with a fixed thread count, runs repeat exactly.
    threads: torch's intra-op threads for the run (restored afterwards); on a shared 2-core machine 1 can be
    faster than 2. precision: "fp32", or "bf16" for bf16 autocast of the forward pass (weights, optimiser and loss
    stay fp32; about 1.5x faster on CPUs with AVX512-BF16, slower on those without).
    """
    from open_clip.loss import ClipLoss
    from tqdm import tqdm

    if epochs is not None and steps is not None:
        raise ValueError("give epochs or steps, not both")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: fp32 or bf16, not {precision!r}")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = read_tsv(tsv)
        n_eval = min(eval_rows, len(rows) // 4)
        train_rows, eval_rows_ = rows[: len(rows) - n_eval], rows[len(rows) - n_eval:]
        model = build_clip(seed)
        size = model.visual.image_size[0]
        tokenizer = get_tokenizer()
        t0 = time.time()
        images = load_images([p for p, _ in train_rows], size, progress)
        texts = tokenizer([c for _, c in train_rows])
        load_s = time.time() - t0

        n = len(train_rows)
        batch_size = min(batch_size, n)
        per_epoch = n // batch_size
        total = int(steps) if steps is not None else max(1, math.ceil((1.0 if epochs is None else epochs) * per_epoch))
        warmup_steps = max(1, round(warmup * total))
        groups = _param_groups(model, weight_decay)
        region = None
        scalar = isinstance(region_weight, float | int)
        if (region_weight if scalar else any(region_weight)):
            if regions is None or len(regions) != len(rows):
                raise ValueError(f"region_weight needs regions for each of the {len(rows)} rows of {tsv}")
            region = _RegionHead(model, regions[: len(train_rows)])
            weights = (float(region_weight),) * len(region.classes) if scalar else tuple(map(float, region_weight))
            if len(weights) != len(region.classes):
                raise ValueError(f"region_weight has {len(weights)} weights for {len(region.classes)} label sets")
            groups[0]["params"].append(region.head.weight)  # decayed like the other matrices
            groups[1]["params"].append(region.head.bias)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total))
        loss_fn = ClipLoss()
        gen = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        model.train()
        t0 = time.time()
        bar = tqdm(total=total, desc="clip", disable=not progress)
        order, pos, smooth = torch.randperm(n, generator=gen), 0, None
        for step in range(total):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos: pos + batch_size]
            pos += batch_size
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                image_features, text_features, scale = model(normalize_images(images[idx]), texts[idx])
            loss = loss_fn(image_features.float(), text_features.float(), scale.float())
            if region is not None:
                loss = loss + region.loss(idx, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            smooth = losses[-1] if smooth is None else 0.9 * smooth + 0.1 * losses[-1]
            bar.set_postfix(loss=f"{smooth:.3f}", scale=f"{scale.item():.1f}")
            bar.update()
        bar.close()
        train_s = time.time() - t0
        model.eval()
        del images
        every = max(1, total // 20)  # the loss curve in metrics: 20 means
        metrics = {
            "model": MODEL_NAME, "seed": seed, "n_train": n, "n_eval": n_eval, "steps": total,
            "epochs": round(total * batch_size / n, 3), "batch_size": batch_size, "lr": lr,
            "weight_decay": weight_decay, "warmup_steps": warmup_steps, "precision": precision,
            "threads": torch.get_num_threads(),
            "load_seconds": round(load_s, 1), "train_seconds": round(train_s, 1),
            "images_per_second": round(total * batch_size / max(train_s, 1e-9), 1),
            "loss_first": losses[0], "loss_last10": float(np.mean(losses[-10:])),
            "loss_curve": {str(i): round(float(np.mean(losses[i: i + every])), 4) for i in range(0, total, every)},
            "logit_scale": model.logit_scale.exp().item(),
        }
        if region is not None:
            region.remove()
            metrics.update({"region_weight": list(weights) if len(weights) > 1 else weights[0],
                            "region_train_acc_last50": [round(float(a), 4) for a in
                                                         np.mean(region.accuracy[-50:], axis=0)]})
        if n_eval:
            eval_images = load_images([p for p, _ in eval_rows_], size)
            metrics.update(evaluate_clip(model, eval_images, [c for _, c in eval_rows_]))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
            f.write("\n")
        return model, metrics
    finally:
        torch.set_num_threads(old_threads)


def tower_cls(tower: nn.Module, image_paths: list[str], batch: int = 256, progress: bool = False) -> torch.Tensor:
    """(N, Dv): the HF vision tower's post-layernormed [CLS] of each image, which `Aligner.image_features` takes
    into the joint space (IVTP's eq. 6)."""
    from tqdm import tqdm

    size = tower.config.image_size
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(image_paths), batch), desc="aligner: images", disable=not progress):
            pixels = normalize_images(load_images(image_paths[i: i + batch], size))
            out.append(tower(pixel_values=pixels.to(tower.dtype)).pooler_output.float())  # (b, Dv)
    return torch.cat(out)


def _joint(aligner, cls: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(aligner.image_features(cls).float(), dim=-1)  # (N, E), unit


def train_aligner(aligner, cls: torch.Tensor, scenes: list, *, steps: int = 1500, batch_size: int = 128,
                  lr: float = 2e-4, eval_images: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """Teach the aligner's text tower words as web text teaches real CLIP's, with the vision tower locked.

    Locked-image tuning: the vision tower stays as it is (LLaVA's tower is this tower, so nothing downstream
    changes); `cls` (N, Dv) are the N images' post-layernormed [CLS] (`tower_cls`), in the order of `scenes`. The
    aligner's `visual.proj`, which only the aligner reads, trains with the text tower. The text tower reads
    `ivtp.data.shapes.web_caption`s (whole scenes, single objects, bare colours, bare shapes), and every content
    word's token feature, which IVTP's eq. 6 reads, is trained on what the caption up to that word claims, against
    every image of the batch, with SigLIP's sigmoid loss (a caption may be true of many images). Every other word (framings such as "this is", "on the left") is trained as true of no
    image: evidence for nothing, so that within an instruction the words that name something rate above the words
    around them, as in real CLIP. The last `eval_images` images are held out for `aligner_metrics`. Trains
    `aligner.text` in place; returns the metrics.
    """
    import random

    from tqdm import tqdm

    from ivtp.data.shapes import ITEMS, scene_items, web_caption, web_caption_words

    tokenizer = aligner.tokenizer
    n_train = len(scenes) - eval_images
    # The captions use a few dozen BPE ids of 49k: train a compact copy of their embedding rows (Adam over the
    # whole table cost two thirds of a step), written back at the end.
    full = aligner.text.token_embedding
    vocab = torch.tensor(vocabulary_ids([*web_caption_words(), ","], tokenizer))
    remap = torch.full((full.num_embeddings,), -1, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    aligner.text.token_embedding = nn.Embedding.from_pretrained(full.weight[vocab].clone(), freeze=False)
    text_params = [p for n, p in aligner.text.named_parameters() if n not in ("logit_scale", "logit_bias")]
    text_params.append(aligner.visual_proj)
    aligner.requires_grad_(False)
    for p in text_params:
        p.requires_grad_(True)
    head = nn.Parameter(torch.tensor([math.log(10.0), -10.0]))  # SigLIP: logits = t * cos + b, t = 10, b = -10
    # Two scalars that must travel far (SigLIP trains them at its full rate over far more steps): 50x the rate.
    optimizer = torch.optim.AdamW([{"params": text_params}, {"params": [head], "lr": 50 * lr}], lr=lr,
                                  betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(1, steps // 20), steps))
    gen, text_rng = torch.Generator().manual_seed(seed), random.Random(seed)
    absent = ~torch.tensor([scene_items(sc) for sc in scenes])  # (N, len(ITEMS))
    losses: list[float] = []
    t0 = time.time()
    aligner.text.train()
    bar = tqdm(range(steps), desc="aligner", disable=not progress)
    for _ in bar:
        idx = torch.randperm(n_train, generator=gen)[:batch_size].tolist()
        batch_scenes = [scenes[i] for i in idx]
        ids = torch.zeros(len(idx), aligner.context_length, dtype=torch.long)
        rows, cols, claimed = [], [], []
        for b, desc in enumerate(web_caption(sc, text_rng) for sc in batch_scenes):
            seq, claims = _caption_claims(desc, tokenizer, aligner.context_length)
            ids[b, : len(seq)] = torch.tensor(seq)
            for pos, items in claims:
                rows.append(b)
                cols.append(pos)
                claimed.append(items)
        claims_hot = torch.zeros(len(claimed), len(ITEMS))  # (M, items)
        for m, items in enumerate(claimed):
            if items is not None:
                claims_hot[m, items] = 1.0
        labels = (claims_hot @ absent[idx].float().T == 0).float()  # (M, B): no claimed item is absent
        labels[[m for m, items in enumerate(claimed) if items is None]] = 0.0
        width = int((ids != 0).sum(1).max())
        compact = remap[ids[:, :width]].masked_fill(ids[:, :width] == 0, 0)  # the padding (id 0) after each caption
        if bool((compact < 0).any()):
            raise ValueError("a web caption holds a word outside web_caption_words()")
        feats = nn.functional.normalize(aligner.token_features(compact).float(), dim=-1)  # (B, C, E)
        picked = feats[torch.tensor(rows), torch.tensor(cols)]  # (M, E): the claims' token features
        logits = head[0].exp() * picked @ _joint(aligner, cls[idx]).T + head[1]  # (M, B)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    with torch.no_grad():
        full.weight[vocab] = aligner.text.token_embedding.weight
    aligner.text.token_embedding = full
    aligner.text.eval()
    aligner.requires_grad_(False)
    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "train_seconds": round(time.time() - t0, 1),
               "loss_first": losses[0], "loss_last50": float(np.mean(losses[-50:])), "held_out": eval_images}
    with torch.no_grad():
        metrics.update(aligner_metrics(aligner, cls[n_train:], scenes[n_train:]))
    return metrics


def _clip_ids(tokenizer, text: str, context_length: int) -> tuple[list[int], list[tuple[int, int]]]:
    """CLIP's ids of `text` with the start and end tokens, and the character span of each text token (the k-th
    span is the token at position k + 1)."""
    from ivtp.aligner import clip_tokens_with_offsets

    tok_ids, spans = clip_tokens_with_offsets(tokenizer, text, context_length - 2)
    return [tokenizer.sot_token_id, *tok_ids, tokenizer.eot_token_id], spans


def _caption_claims(desc, tokenizer, context_length: int) -> tuple[list[int], list[tuple[int, list[int] | None]]]:
    """A web caption's CLIP ids and what train_aligner supervises: (token position, indices into ITEMS that must
    all be present) for the last token of each content word and for the end token (the whole caption), and
    (position, None) for every other word's last token (true of no image)."""
    from ivtp.data.shapes import ITEM_INDEX

    seq, spans = _clip_ids(tokenizer, desc.text, context_length)
    token_at_end = {end: k + 1 for k, (_, end) in enumerate(spans)}
    claims = [(token_at_end[end], items) for end, items in desc.claims if end in token_at_end]
    claims.append((len(seq) - 1, desc.claims[-1][1]))
    claims = [(pos, [ITEM_INDEX[item] for item in items]) for pos, items in claims]
    claimed_ends = {end for end, _ in desc.claims}
    text = desc.text
    claims += [(k, None) for end, k in token_at_end.items()
               if end not in claimed_ends and text[end - 1].isalpha() and (end == len(text) or not text[end].isalpha())]
    return seq, claims


def question_relevance(aligner, cls: torch.Tensor, template: str, words: list[str]) -> torch.Tensor:
    """(N, W): eq. 6's cosine of each word (its BPE tokens' mean) inside `template` ("What colour is the {w}?")
    to each of N images given by their post-layernormed [CLS] (N, Dv), as IVTP rates an instruction."""
    image_embeds = _joint(aligner, cls)
    out = []
    for w in words:
        text = template.format(w=w)
        seq, spans = _clip_ids(aligner.tokenizer, text, aligner.context_length)
        start = text.index(w)
        pos = [k + 1 for k, (a, b) in enumerate(spans) if a < start + len(w) and b > start]
        ids = torch.tensor([seq])
        feats = nn.functional.normalize(aligner.token_features(ids)[0, pos].float(), dim=-1)  # (k, E)
        out.append((image_embeds @ feats.T).mean(dim=1))
    return torch.stack(out, dim=1)


def aligner_metrics(aligner, cls: torch.Tensor, scenes: list) -> dict:
    """How the aligner rates the key word of the testbed's questions: present vs absent shape words in "What colour
    is the <shape>?", colour words in "What shape is the <colour> object?", and shape words in "a <shape>", as
    AUCs per image and pooled over images (`relevance_aucs`)."""
    from ivtp.data.shapes import COLOURS, SHAPES

    out = {}
    for kind, words, template, attr in (("shape_question", list(SHAPES), "What colour is the {w}?", "shape"),
                                        ("colour_question", list(COLOURS), "What shape is the {w} object?", "colour"),
                                        ("shape_word", list(SHAPES), "a {w}", "shape")):
        cos = question_relevance(aligner, cls, template, words)
        present = torch.tensor([[any(getattr(o, attr) == w for o in sc.objects) for w in words] for sc in scenes])
        out[f"relevance_auc_{kind}"], out[f"relevance_auc_{kind}_pooled"] = relevance_aucs(cos, present)
    return out


def _as_labels(labels) -> tuple[int, ...]:
    return (labels,) if isinstance(labels, int) else tuple(labels)


class _RegionHead:
    """The auxiliary object classifier of train_clip: a hook keeps the feature layer's output, `loss` classifies
    each object of a batch from the mean of its patches there, on one or more label sets (shape, position, ...).

    regions[i]: image i's objects as (labels, patch indices); labels is a class index, or a tuple of them with one
    entry per label set. One linear layer scores all sets (its outputs are the sets' logits side by side)."""

    def __init__(self, model: nn.Module, regions: list[list[tuple]]):
        blocks = model.visual.transformer.resblocks
        width = blocks[-2].ln_1.normalized_shape[0]
        self.regions = [[(_as_labels(labels), patches) for labels, patches in objs] for objs in regions]
        labels = [lab for objs in self.regions for lab, _ in objs]
        if len({len(lab) for lab in labels}) != 1:
            raise ValueError("every object of `regions` needs the same number of labels")
        self.classes = [1 + max(lab[t] for lab in labels) for t in range(len(labels[0]))]
        self.head = nn.Linear(width, sum(self.classes))
        self.accuracy: list[list[float]] = []  # per step, per label set
        self._out = None
        self._handle = blocks[-2].register_forward_hook(self._keep)  # LLaVA's feature layer: hidden_states[-2]

    def _keep(self, module, args, output):
        self._out = output

    def loss(self, idx: torch.Tensor, weights: tuple[float, ...] | None = None) -> torch.Tensor:
        """The sum over label sets of `weights` (default 1 each) times the cross-entropy of the objects of the
        images `idx` (the batch's rows)."""
        h = self._out[:, 1:].float()  # (B, P, W) patch tokens, [CLS] dropped (batch-first open_clip)
        b, p, _ = h.shape
        pool, labels = [], []
        for row, i in enumerate(idx.tolist()):
            for lab, patches in self.regions[i]:
                w = torch.zeros(b, p)
                w[row, patches] = 1.0 / len(patches)
                pool.append(w.view(-1))
                labels.append(lab)
        pooled = torch.stack(pool) @ h.reshape(b * p, -1)  # (objects, W): mean of each object's patches
        logits = self.head(pooled).split(self.classes, dim=-1)  # per label set: (objects, classes)
        target = torch.tensor(labels)  # (objects, sets)
        self.accuracy.append([float((lg.argmax(-1) == target[:, t]).float().mean()) for t, lg in enumerate(logits)])
        weights = weights or (1.0,) * len(logits)
        losses = [w * nn.functional.cross_entropy(lg, target[:, t]) for t, (w, lg) in enumerate(zip(weights, logits))]
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    def remove(self) -> None:
        self._handle.remove()


# ---- evaluation ------------------------------------------------------------------------------------------------
def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney AUC)."""
    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    d = positive.reshape(-1, 1) - negative.reshape(1, -1)
    return float((d > 0).double().mean() + 0.5 * (d == 0).double().mean())


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def word_relevance(model: nn.Module, images: torch.Tensor, words: list[str], template: str = "{a} {w}") -> torch.Tensor:
    """(N images, len(words)): the joint-space cosine of each word's token(s) in `template` ("{a} {w}": "a red",
    "an orange") to each image: the aligner's `token_features` against the projected [CLS], as IVTP's eq. 6 rates
    instruction tokens (a word of several BPE tokens: their mean)."""
    from ivtp.aligner import Aligner

    tokenizer = get_tokenizer()
    aligner = Aligner(copy.deepcopy(model), model.visual.proj, tokenizer).eval()  # a copy: Aligner freezes it
    with torch.no_grad():
        image = nn.functional.normalize(model.encode_image(normalize_images(images)).float(), dim=-1)  # (N, E)
        out = []
        for w in words:
            text = template.format(a=_article(w).split()[0], w=w)
            seq = [tokenizer.sot_token_id] + tokenizer.encode(text) + [tokenizer.eot_token_id]
            piece = tokenizer.encode(w)
            start = next(i for i in range(len(seq)) if seq[i: i + len(piece)] == piece)
            feats = aligner.token_features(tokenizer([text]))[0, start: start + len(piece)]
            out.append((image @ nn.functional.normalize(feats.float(), dim=-1).T).mean(dim=1))
    return torch.stack(out, dim=1)


def relevance_aucs(cos: torch.Tensor, present: torch.Tensor) -> tuple[float, float]:
    """(per-image AUC, pooled AUC) of cosines (N, W) against presence (N, W, bool). Per image: words present vs
    absent in that image, averaged over the images that have both (what a threshold on one instruction meets);
    pooled: all (image, word) pairs together (it also needs the cosine's level to agree across images)."""
    per = [auc(cos[i][present[i]], cos[i][~present[i]]) for i in range(len(cos)) if 0 < int(present[i].sum()) <
           present.shape[1]]
    return (float(np.mean(per)) if per else float("nan")), auc(cos[present], cos[~present])


def evaluate_clip(model: nn.Module, images: torch.Tensor, captions: list[str]) -> dict:
    """Held-out metrics. images: uint8 (N, 3, H, W); captions: their `short_caption`s.

    - i2t_top1 / t2i_top1: how often an image's own caption is the closest of the N (and the reverse); chance 1/N.
    - relevance_auc_colour / _shape: token-level relevance as IVTP uses it. For every image and each of the 6
      colours (3 shapes), the cosine of the word's token in "a <word>" to the image; present (named in the
      caption, which names every object) vs absent, per image (see `relevance_aucs`); `_pooled`: over all pairs.
      relevance_auc_colour_question: the same at the colour in "What shape is the <colour> object?".
    """
    from ivtp.data.shapes import COLOURS, SHAPES

    tokenizer = get_tokenizer()
    model.eval()
    with torch.no_grad():
        img = nn.functional.normalize(model.encode_image(normalize_images(images)), dim=-1)
        txt = nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        sim = img @ txt.T
        target = torch.arange(len(captions))
        out = {"i2t_top1": float((sim.argmax(1) == target).float().mean()),
               "t2i_top1": float((sim.argmax(0) == target).float().mean()), "chance": 1 / len(captions)}
    words_in = [set(c.replace(",", " ").split()) for c in captions]
    for kind, words, template in (("colour", list(COLOURS), "{a} {w}"), ("shape", list(SHAPES), "{a} {w}"),
                                  ("colour_question", list(COLOURS), "What shape is the {w} object?")):
        cos = word_relevance(model, images, words, template)
        present = torch.tensor([[w in ws for w in words] for ws in words_in])
        out[f"relevance_auc_{kind}"], out[f"relevance_auc_{kind}_pooled"] = relevance_aucs(cos, present)
    return out


# ---- exports ---------------------------------------------------------------------------------------------------
def vision_config(model: nn.Module):
    """The HF `CLIPVisionConfig` equivalent to the open_clip visual tower."""
    from open_clip.transformer import QuickGELU
    from transformers import CLIPVisionConfig

    v = model.visual
    block = v.transformer.resblocks[0]
    if getattr(v, "attn_pool", None) is not None or getattr(v, "pool_type", "tok") != "tok" or v.final_ln_after_pool:
        raise ValueError("only class-token pooling maps onto HF CLIPVisionModel")
    if not isinstance(v.ln_pre, nn.LayerNorm) or not isinstance(block.ls_1, nn.Identity):
        raise ValueError("the tower must have ln_pre and no layer scale to map onto HF CLIPVisionModel")
    return CLIPVisionConfig(
        hidden_size=v.conv1.out_channels, intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(v.transformer.resblocks), num_attention_heads=block.attn.num_heads,
        image_size=v.image_size[0], patch_size=v.patch_size[0], projection_dim=v.proj.shape[1], num_channels=3,
        hidden_act="quick_gelu" if isinstance(block.mlp.gelu, QuickGELU) else "gelu", layer_norm_eps=v.ln_pre.eps,
    )


def vision_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The visual tower's weights under HF `CLIPVisionTransformer` names (no prefix)."""
    v = model.visual
    sd = {
        "embeddings.class_embedding": v.class_embedding,
        "embeddings.patch_embedding.weight": v.conv1.weight,
        "embeddings.position_embedding.weight": v.positional_embedding,
        "pre_layrnorm.weight": v.ln_pre.weight, "pre_layrnorm.bias": v.ln_pre.bias,
        "post_layernorm.weight": v.ln_post.weight, "post_layernorm.bias": v.ln_post.bias,
    }
    for i, block in enumerate(v.transformer.resblocks):
        p = f"encoder.layers.{i}."
        qw, kw, vw = block.attn.in_proj_weight.chunk(3, dim=0)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3, dim=0)
        sd.update({
            p + "self_attn.q_proj.weight": qw, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": kw, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": vw, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": block.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": block.attn.out_proj.bias,
            p + "layer_norm1.weight": block.ln_1.weight, p + "layer_norm1.bias": block.ln_1.bias,
            p + "mlp.fc1.weight": block.mlp.c_fc.weight, p + "mlp.fc1.bias": block.mlp.c_fc.bias,
            p + "mlp.fc2.weight": block.mlp.c_proj.weight, p + "mlp.fc2.bias": block.mlp.c_proj.bias,
            p + "layer_norm2.weight": block.ln_2.weight, p + "layer_norm2.bias": block.ln_2.bias,
        })
    return {k: t.detach().clone() for k, t in sd.items()}


def to_hf_vision(model: nn.Module):
    """An HF `CLIPVisionModel` (fp32, eval) with the open_clip visual tower's weights, copied exactly."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(vision_config(model))
    keys = tower.state_dict().keys()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
    state = {prefix + k: t.float() for k, t in vision_state_dict(model).items()}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"vision tower export: missing {missing}, unexpected {unexpected}")
    return tower.eval()


def image_processor(size: int):
    """Shortest side to `size` (bicubic), centre crop `size`, OpenAI CLIP mean/std: what LLaVA-1.5's tower uses."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_resize=True, do_center_crop=True, resample=3, image_mean=list(OPENAI_DATASET_MEAN),
                              image_std=list(OPENAI_DATASET_STD))


def export_vision_tower(model: nn.Module, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Save the visual tower as an HF `CLIPVisionModel` folder (`from_pretrained(out_dir)`) with its
    `CLIPImageProcessor`. dtype: torch.float32 (exact) or torch.float16 (half the size). Returns out_dir."""
    tower = to_hf_vision(model).to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    tower.save_pretrained(out_dir)
    image_processor(tower.config.image_size).save_pretrained(out_dir)
    return out_dir


def vocabulary_ids(texts: Iterable[str], tokenizer) -> list[int]:
    """Sorted CLIP BPE ids occurring in `texts`, plus the start and end tokens."""
    ids = {tokenizer.sot_token_id, tokenizer.eot_token_id}
    for text in set(texts):
        ids.update(tokenizer.encode(text))
    return sorted(ids)


def export_aligner(model: nn.Module, path: str, vocabulary_texts: Iterable[str],
                   model_name: str = MODEL_NAME) -> dict:
    """Save what `ivtp.aligner.Aligner` needs, from an open_clip CLIP or an Aligner, as fp16 safetensors: the
    text tower, `text_projection` and `visual.proj`, with only the `token_embedding` rows of the BPE ids that occur in `vocabulary_texts` (and
    <start>/<end>): `token_embedding.rows` (fp16 [k, W]) and `token_embedding.ids` (int64 [k]) replace
    `token_embedding.weight`. On loading, every other id gets a ZERO embedding, so text outside that vocabulary
    (new words) is rated from position and context only. Returns {"path", "bytes", "vocabulary"}."""
    from safetensors.torch import save_file

    ids = vocabulary_ids(vocabulary_texts, get_tokenizer())
    sd = text_state_dict(model)
    weight = sd.pop("token_embedding.weight")
    tensors = {k: t.detach().to(torch.float16).contiguous() for k, t in sd.items()}
    index = torch.tensor(ids, dtype=torch.int64)
    tensors[ROWS_KEY] = weight.detach()[index].to(torch.float16).contiguous()
    tensors[IDS_KEY] = index
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"format": "ivtp-aligner", "model": model_name,
                                       "vocab_size": str(weight.shape[0])})
    return {"path": path, "bytes": os.path.getsize(path), "vocabulary": len(ids)}
