"""Every method behind apply_pruning, on the real transformers LLaVA (tiny random configs)."""

import pytest
import torch

from conftest import assert_cache_matches_recompute, assert_static_cache_matches_dynamic, batch_of, prompt
from ivtp import ConfigError, PruneConfig, apply_pruning
from ivtp.config import METHODS
from ivtp.models import tiny_aligner

N = 64  # patches of the 112 px test model (8 x 8), 7 feature layers


def pruned(small_llava, config):
    model, processor = small_llava()
    apply_pruning(model, config, aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    return model, processor


# Each method's config at 16 visual tokens per image (a quarter of the 64 patches).
AT_16 = {
    "ivtp": {"vision": {"keep": 32}, "llm": {"keep": 16, "layers": 6}},
    "random": {"random": {"keep": 16}}, "topk": {"topk": {"keep": 16}}, "spatial": {"spatial": {"keep": 16}},
    "evit": {"evit": {"keep": 16}}, "tome": {"tome": {"keep": 16}}, "fastervlm": {"fastervlm": {"keep": 16}},
    "vispruner": {"vispruner": {"visual_token_num": 16}}, "fastv": {"fastv": {"keep": 16}},
    "visiondrop": {"visiondrop": {"dominant": 24, "contextual": 8, "llm": [[2, 16, 4], [4, 12, 4]]}},
    "topk+": {"topk": {"keep": 32}, "llm": {"keep": 16, "layers": 6}},
    "tome+": {"tome": {"keep": 32}, "llm": {"keep": 16, "layers": 6}},
    "sparsevlm": {"sparsevlm": {"budget": 64}},  # fixed schedule: on 64 patches 63+1, 30+2, 17+1 = 18
}
KEEP_ALL = {  # the methods that can express keep-all, and how
    "random": {"random": {"keep": 1.0}}, "topk": {"topk": {"keep": 1.0}}, "spatial": {"spatial": {"keep": N}},
    "tome": {"tome": {"keep": 1.0}}, "fastervlm": {"fastervlm": {"keep": 1.0}},
    "vispruner": {"vispruner": {"visual_token_num": 1.0}}, "fastv": {"fastv": {"ratio": 0.0}},
    "visiondrop": {"visiondrop": {"dominant": N, "contextual": 0, "llm": [[2, N, 0]], "cls": False}},
    "topk+": {"topk": {"keep": 1.0}, "llm": {"keep": 1.0, "layers": 6}},
    "tome+": {"tome": {"keep": 1.0}, "llm": {"keep": 1.0, "layers": 6}},
}


def test_every_method_is_covered():
    assert set(AT_16) == set(METHODS)


@pytest.mark.parametrize("method", sorted(KEEP_ALL))
def test_keep_all_equals_the_stock_model(small_llava, images, method):
    stock, processor = small_llava()
    model, _ = pruned(small_llava, {"method": method, **KEEP_ALL[method]})
    batch = batch_of(processor, images(2) + [None], ["What colour is it?", "Where is the square?", "Hi"])
    with torch.no_grad():
        ref, out = stock(**batch).logits, model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", sorted(AT_16))
def test_every_method_hands_the_llm_its_budget(small_llava, images, method):
    model, processor = pruned(small_llava, {"method": method, **AT_16[method]})
    batch = batch_of(processor, images(2), ["What colour is it?", "Where is the square?"])
    with torch.no_grad():
        out = model(**batch)
    state = model.ivtp_state
    per_layer = state.llm_tokens_per_layer(32)
    final = 18 if method == "sparsevlm" else 16
    assert per_layer[-1] == final  # what reaches the last LLM layer
    trace = state.last_vision.trace
    if state.llm_plan is None:
        assert out.logits.shape[1] == batch["input_ids"].shape[1] - (N - 16)
    kept = trace.kept
    assert torch.equal(kept, kept.sort(-1).values)  # patches stay in spatial order
    if method in ("random", "topk", "fastervlm", "vispruner"):
        assert kept.shape == (2, 16)
    for r in range(2):
        report = state.row_report(r, r, 1)
        assert report["visual_tokens"][0] == N and report["visual_tokens"][-1] == final


@pytest.mark.parametrize("method", ["fastv", "visiondrop", "sparsevlm", "topk+", "tome+"])
def test_in_llm_methods_decode_exactly_with_the_cache(small_llava, images, method):
    model, processor = pruned(small_llava, {"method": method, **AT_16[method]})
    batch = batch_of(processor, images(2) + [None], ["What colour is it?", "Is there a big red square?", "Hi"])
    assert_cache_matches_recompute(model, batch, new_tokens=6)
    assert_static_cache_matches_dynamic(model, batch, new_tokens=6)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method", sorted(AT_16))
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(small_llava, images, method, reentrant):
    """LLaVA's recipe trains with gradient checkpointing: recomputing each layer in the backward pass (either torch
    flavour) must give the gradients of the plain run, with the pruning active."""
    results = []
    for checkpointing in (False, True):
        model, processor = pruned(small_llava, {"method": method, **AT_16[method]})
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_("vision_tower" not in name)  # the tower stays frozen, as in LLaVA-1.5
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        batch = batch_of(processor, images(2) + [None], ["What colour is it?", "Is there a big red square?", "Hi"],
                         padding_side="right")
        labels = torch.full_like(batch["input_ids"], -100)  # the last two tokens are the answer
        end = batch["attention_mask"].sum(1)
        for r in range(3):
            labels[r, end[r] - 2 : end[r]] = batch["input_ids"][r, end[r] - 2 : end[r]]
        out = model(**batch, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys() and any("language_model" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_sparsevlm_without_instruction_text_says_why(small_llava, images):
    model, processor = pruned(small_llava, {"method": "sparsevlm", **AT_16["sparsevlm"]})
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images(1), text=["USER: describe <image>"], return_tensors="pt")  # nothing after it
    with pytest.raises(ValueError, match="row 0 has an image but no instruction text"):
        model(**batch)


@pytest.mark.parametrize("method", sorted(AT_16))
def test_accelerate_dispatch_hooks_change_nothing(small_llava, images, method):
    """A model loaded with device_map (or offloading) has accelerate hooks on its layers that rebuild every dict
    they move to the layer's device; the probes the layers write into must survive them. Hooks on every tower and
    decoder layer: the same logits and the same greedy generation as without."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    plain, processor = pruned(small_llava, {"method": method, **AT_16[method]})
    hooked, _ = pruned(small_llava, {"method": method, **AT_16[method]})
    for layer in [*hooked.model.vision_tower.encoder.layers, *hooked.model.language_model.layers]:
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu"))
    batch = batch_of(processor, images(2) + [None], ["What colour is it?", "Is there a big red square?", "Hi"])
    with torch.no_grad():
        torch.testing.assert_close(hooked(**batch).logits, plain(**batch).logits, rtol=0, atol=0)
        kw = dict(max_new_tokens=4, do_sample=False)
        assert torch.equal(hooked.generate(**batch, **kw), plain.generate(**batch, **kw))


def fastv_reference(attentions, input_ids, image_token_id: int, k_layer: int, keep: int) -> list[torch.Tensor]:
    """FastV re-derived from its paper and code, per row: at layer K it takes layer K-1's attention probabilities
    (softmax over each query's whole causal row), averages the heads, reads the last token's row at the image
    columns, and keeps the `keep` highest; the kept tokens keep their positions (sorted)."""
    out = []
    for r in range(input_ids.shape[0]):
        probs = attentions[k_layer - 1][r].mean(0)  # (L, L): head mean of layer K-1
        image = torch.nonzero(input_ids[r] == image_token_id).flatten()
        out.append(image[probs[-1, image].topk(keep).indices].sort().values)
    return out


def test_fastv_ranks_as_its_authors_do(small_llava, images):
    """K=2: layer 1's attention ranks the image tokens, as FastV's code does (the stock eager model's attention
    probabilities, rows with left padding of different lengths)."""
    model, processor = pruned(small_llava, {"method": "fastv", "fastv": {"layer": 2, "keep": 16}})
    stock, _ = small_llava()
    stock.set_attn_implementation("eager")
    for m in (model, stock):  # heads with peaked, differing attention, as a trained LLM's (random init is flat)
        with torch.no_grad():
            for layer in m.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(100.0)
    batch = batch_of(processor, images(2), ["What colour is it?", "Is there a large red square in the picture?"])
    with torch.no_grad():
        model(**batch)
        attentions = stock(**batch, output_attentions=True).attentions
    image_id = stock.config.image_token_id
    expected = fastv_reference(attentions, batch["input_ids"], image_id, 2, 16)
    kept = model.ivtp_state.last_llm_trace.kept_positions
    assert all(torch.equal(a, b) for a, b in zip(kept, expected))
    assert model.ivtp_state.last_llm_trace.counts == [[64, 16], [64, 16]]
    # The reference tells the deviations apart on these inputs: one layer late, or a softmax over the image keys
    # alone (per head, then the head mean), each keep another set.
    assert fastv_reference(attentions, batch["input_ids"], image_id, 3, 16)[1].tolist() != expected[1].tolist()
    q_len = batch["input_ids"].shape[1]
    logits = attentions[1][1].clamp_min(1e-30).log()  # (H, L, L): log-probabilities of row 1, layer 1
    image = torch.nonzero(batch["input_ids"][1] == image_id).flatten()
    image_only = logits[:, q_len - 1, image].softmax(-1).mean(0)  # renormalised over the image per head
    assert image[image_only.topk(16).indices].sort().values.tolist() != expected[1].tolist()


def test_cli_method_defaults_and_budget_report(capsys):
    import json

    from ivtp.cli import main

    assert PruneConfig.for_method("topk+").topk.keep == 128  # the "+" variant hands IVTP's stage 2 128 tokens
    assert main(["generate", "--method", "fastv", "--image", "data/fixtures/images/scene0.png", "--prompt",
                 "What colour?", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == [[576, 288]]  # FastV's default, K=2 and R=50%: half from layer 2 on
    assert out["llm_visual_tokens_per_layer"][:4] == [576, 576, 288, 288]
    assert out["equivalent_visual_tokens"] == pytest.approx((2 * 576 + 30 * 288) / 32)
    assert out["final_visual_tokens"] == 288


def test_impossible_budgets_and_knobs_name_the_method(small_llava):
    model, processor = small_llava()
    for config, match in [({"method": "fastv", "fastv": {"layer": 32}}, "fastv.layer"),
                          ({"method": "visiondrop", "visiondrop": {"llm": [[32, 10, 2]]}}, "visiondrop.llm"),
                          ({"method": "visiondrop", "visiondrop": {"dominant": 60, "contextual": 6}}, "visiondrop"),
                          ({"method": "sparsevlm", "sparsevlm": {"budget": 100}}, "sparsevlm.budget"),
                          ({"method": "topk", "topk": {"keep": 65}}, "topk.keep"),
                          ({"method": "evit", "evit": {"keep": 1}}, "evit.keep"),
                          ({"method": "vispruner", "vispruner": {"important_ratio": 0.0}}, "vispruner.important_ratio"),
                          ({"method": "topk+", "topk": {"keep": 16}, "llm": {"keep": 32, "layers": 6}}, "llm.keep")]:
        with pytest.raises(ConfigError, match=match):
            apply_pruning(model, config, aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    assert not hasattr(model, "ivtp_state")


def test_visiondrop_stages_follow_its_schedule_at_the_defaults(small_llava, images):
    """48 -> 35 -> 26 -> 19 at VisionDrop's defaults, the LLM stages at the inputs of layers 8, 16 and 24."""
    model, processor = pruned(small_llava, {"method": "visiondrop", "visiondrop": {"dominant": 42, "contextual": 6}})
    batch = batch_of(processor, images(1), ["What colour is it?"])
    with torch.no_grad():
        model(**batch)
    assert model.ivtp_state.row_report(0, 0, 1)["visual_tokens"] == [N, 48, 35, 26, 19]
    per_layer = model.ivtp_state.llm_tokens_per_layer(32)
    assert per_layer[7:9] == [48, 35] and per_layer[15:17] == [35, 26] and per_layer[23:25] == [26, 19]


def visiondrop_encoder_reference(attn, hidden, keys, dominant: int, contextual: int) -> torch.Tensor:
    """VisionDrop's encoder stage re-derived from its paper and code (VisionZip's), on the feature layer's
    attention probabilities attn (B, H, L, L), tokens hidden (B, L, D) and head-mean keys (B, L, Dh), [CLS] at 0:
    [CLS] and the dominant - 1 patches with the most [CLS] attention (summed over heads), in sequence order; the
    remaining patches give `contextual` targets at a stride, and every other one joins its most key-similar target;
    a contextual token is its target plus the mean of its members. Returns (B, dominant + contextual, D)."""
    b, length, d = hidden.shape
    top = attn[:, :, 0, 1:].sum(1).topk(dominant - 1).indices + 1  # (B, dominant - 1) token indices
    chosen = torch.zeros(b, length, dtype=torch.bool).scatter(1, top, True)
    chosen[:, 0] = True
    rest, rest_keys = hidden[~chosen].view(b, length - dominant, d), keys[~chosen].view(b, length - dominant, -1)
    rest_keys = rest_keys / rest_keys.norm(dim=-1, keepdim=True)
    stride = max(1, (length - dominant) // contextual)
    is_target = torch.zeros(length - dominant, dtype=torch.bool)
    is_target[torch.arange(0, length - dominant, stride)[:contextual]] = True
    nearest = (rest_keys[:, ~is_target] @ rest_keys[:, is_target].transpose(1, 2)).argmax(-1)  # (B, M)
    members = torch.nn.functional.one_hot(nearest, contextual).float().transpose(1, 2)  # (B, c, M)
    mean = members @ rest[:, ~is_target] / members.sum(-1, keepdim=True).clamp_min(1)
    return torch.cat([hidden[chosen].view(b, dominant, d), rest[:, is_target] + mean], dim=1)


@pytest.mark.parametrize("dominant,contextual", [(42, 6), (10, 5)])
def test_visiondrop_encoder_stage_as_its_authors_run_it(small_llava, images, dominant, contextual):
    """The tokens the projector receives equal the re-derivation on the stock tower's layer -2 ([CLS] included)."""
    model, processor = pruned(small_llava, {"method": "visiondrop", "visiondrop": {
        "dominant": dominant, "contextual": contextual, "llm": []}})
    stock, _ = small_llava()
    stock.set_attn_implementation("eager")
    batch = batch_of(processor, images(2), ["What colour is it?", "Where is it?"])
    seen, keys = [], []
    model.model.multi_modal_projector.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    layer = stock.model.vision_tower.encoder.layers[stock.config.vision_feature_layer]
    heads = stock.config.vision_config.num_attention_heads
    layer.self_attn.k_proj.register_forward_hook(
        lambda m, args, out: keys.append(out.view(*out.shape[:2], heads, -1).mean(2)))
    with torch.no_grad():
        model(**batch)
        tower = stock.model.vision_tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    f = stock.config.vision_feature_layer
    expected = visiondrop_encoder_reference(tower.attentions[f], tower.hidden_states[f], keys[0], dominant,
                                            contextual)
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)


def evit_reference(layer, x, keep: int) -> torch.Tensor:
    """EViT's Block re-derived from its paper and code, on the stock CLIP layer `layer` and its input x (B, L, D):
    attention with its residual; the [CLS] row of the attention probabilities averaged over heads ranks the
    patches; the top keep - 1 stay (here in spatial order), the others are summed with those weights into one
    token; the MLP and its residual run on [CLS], the kept patches and the fused token. Returns (B, keep, D)."""
    attn, probs = layer.self_attn(layer.layer_norm1(x))  # eager: (B, L, D), (B, H, L, L)
    x = x + attn
    cls_attn = probs[:, :, 0, 1:].mean(1)  # (B, L - 1)
    top = cls_attn.topk(keep - 1).indices.sort().values  # (B, keep - 1)
    patches = x[:, 1:]
    rest = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, top, False)
    fused = (patches * (cls_attn * rest)[..., None]).sum(1, keepdim=True)  # (B, 1, D): a sum, not a mean
    kept = torch.gather(patches, 1, top[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], kept, fused], dim=1)
    return (x + layer.mlp(layer.layer_norm2(x)))[:, 1:]


def test_evit_prunes_and_fuses_as_its_authors_do(small_llava, images):
    """The projector's input equals EViT's Block on the stock tower's feature layer."""
    model, processor = pruned(small_llava, {"method": "evit", "evit": {"keep": 16}})
    stock, _ = small_llava()
    stock.set_attn_implementation("eager")
    batch = batch_of(processor, images(2), ["What colour is it?", "Where is it?"])
    seen = []
    model.model.multi_modal_projector.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    f = stock.config.vision_feature_layer
    layer = stock.model.vision_tower.encoder.layers[f]
    with torch.no_grad():
        model(**batch)
        tower = stock.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
        expected = evit_reference(layer, tower.hidden_states[f - 1], 16)
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)
    # `fuse: mean` (ours) keeps the same patches and differs in the fused token alone: the reference tells them apart.
    mean, _ = pruned(small_llava, {"method": "evit", "evit": {"keep": 16, "fuse": "mean"}})
    mean.model.multi_modal_projector.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        mean(**batch)
    torch.testing.assert_close(seen[1][:, :-1], expected[:, :-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[1][:, -1], expected[:, -1], rtol=1e-3, atol=1e-3)


def visiondrop_llm_reference(stock, embeds, start: int, n: int, stages) -> torch.Tensor:
    """VisionDrop's LLM stages re-derived from its paper and code, one row without padding, over the stock
    decoder layers. At the input of layer L of a stage [L, d, c]: layer L's own q and k at the current positions;
    each image token's attention over its whole causal row, the head mean, read at the image columns and averaged
    over the image queries; the d highest stay, in order; the other image tokens give c targets at a stride and the
    rest join the target whose RoPE'd head-mean key is most cosine-similar; a contextual token is its target plus
    its members' mean. The sequence is rebuilt as [before, dominant, contextual, after] and numbered 0, 1, ...
    again. Returns the last token's logits."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    lm = stock.model.language_model
    h, at = embeds, {layer: (d, c) for layer, d, c in stages}
    for i, layer in enumerate(lm.layers):
        rope = lm.rotary_emb(h, torch.arange(h.shape[1])[None])
        if i in at:
            d, c = at[i]
            attn, x, length = layer.self_attn, layer.input_layernorm(h), h.shape[1]
            q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *rope)
            logits = q[:, :, start:start + n] @ repeat_kv(k, attn.num_key_value_groups).transpose(-1, -2) * attn.scaling
            later = torch.arange(length)[None, :] > torch.arange(start, start + n)[:, None]  # (n, L) future keys
            probs = logits.masked_fill(later, float("-inf")).softmax(-1)  # (1, H, n, L)
            score = probs.mean(1)[0][:, start:start + n].mean(0)  # (n,)
            dominant = score.topk(d).indices.sort().values
            rest = torch.tensor([j for j in range(n) if j not in set(dominant.tolist())])
            metric = k[0].mean(0)[start:start + n][rest]
            metric = metric / metric.norm(dim=-1, keepdim=True)
            is_target = torch.zeros(len(rest), dtype=torch.bool)
            is_target[torch.arange(0, len(rest), max(1, len(rest) // c))[:c]] = True
            nearest = (metric[~is_target] @ metric[is_target].T).argmax(-1)
            image = h[0, start:start + n]
            members = torch.nn.functional.one_hot(nearest, c).float().T  # (c, M)
            contextual = image[rest][is_target] + members @ image[rest][~is_target] / members.sum(-1, keepdim=True).clamp_min(1)
            h = torch.cat([h[:, :start], image[dominant][None], contextual[None], h[:, start + n:]], dim=1)
            n = d + c
            rope = lm.rotary_emb(h, torch.arange(h.shape[1])[None])
        h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=torch.arange(h.shape[1])[None])
    return stock.lm_head(lm.norm(h))[0, -1]


def test_visiondrop_llm_stages_as_its_authors_run_them(small_llava, images):
    """The last token's logits equal the re-derivation fed the same LLM input (renumbered positions, contextual
    tokens after the dominant ones); keeping the positions (ours) does not."""
    stages = [[2, 16, 4], [4, 12, 4]]
    out = {}
    for positions in ("renumber", "keep"):
        model, processor = pruned(small_llava, {"method": "visiondrop", "visiondrop": {
            "dominant": 24, "contextual": 8, "llm": stages, "positions": positions}})
        seen = {}
        model.model.language_model.register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
        batch = batch_of(processor, images(1), ["Where is the red circle in the picture?"])
        with torch.no_grad():
            out[positions] = model(**batch).logits[0, -1]
        visual = model.ivtp_state.last_llm_trace.visual_positions[0]
    stock, _ = small_llava()
    with torch.no_grad():
        expected = visiondrop_llm_reference(stock, seen["embeds"], int(visual[0]), len(visual),
                                            [[layer, d, c] for layer, d, c in stages])
    torch.testing.assert_close(out["renumber"], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["keep"], expected, rtol=1e-3, atol=1e-3)


def test_visiondrop_renumbered_batch_equals_single_rows(small_llava, images):
    """Renumbering under left padding and a text-only row: each row's last logits as when run alone."""
    model, processor = pruned(small_llava, {"method": "visiondrop", "visiondrop": {
        "dominant": 24, "contextual": 8, "llm": [[2, 16, 4], [4, 12, 4]]}})
    questions = ["What colour is it?", "Is there a large red square anywhere in the picture?", "Hi"]
    pictures = images(2) + [None]
    with torch.no_grad():
        batched = model(**batch_of(processor, pictures, questions)).logits[:, -1]
        for r in range(3):
            alone = model(**batch_of(processor, pictures[r : r + 1], questions[r : r + 1])).logits[0, -1]
            torch.testing.assert_close(batched[r], alone, rtol=1e-4, atol=1e-4)


def sparsevlm_llm_reference(stock, embeds, start: int, n: int, raters, stages) -> torch.Tensor:
    """SparseVLM v1.5's LLM stages, one row without padding, over the stock decoder layers, as its code rebuilds
    the sequence: at a stage (layer l, keep k), layer l's attention probabilities (each head's softmax over the
    whole causal row, q and k at the current positions) in the raters' rows and the image columns score the image
    (score_visual); layer l runs; its output's image segment becomes [kept tokens in order, recycled tokens]
    (sparsevlm_prune: the selection and recycling, checked against the authors' rules in tests/ops); the sequence
    [prefix, segment, text] is numbered 0, 1, ... again. raters: (L,) bool over the input positions. Returns the
    last token's logits. What this re-derives is the sequence: order, positions, and where the scores come from."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    from ivtp.ops.sparsevlm import score_visual, sparsevlm_prune

    lm = stock.model.language_model
    h, at, rows = embeds, dict(stages), torch.nonzero(raters).flatten()  # rows: the raters' current indices
    for i, layer in enumerate(lm.layers):
        pos = torch.arange(h.shape[1])[None]
        rope = lm.rotary_emb(h, pos)
        if i in at:
            attn, x, length = layer.self_attn, layer.input_layernorm(h), h.shape[1]
            q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *rope)
            logits = q @ repeat_kv(k, attn.num_key_value_groups).transpose(-1, -2) * attn.scaling  # (1, H, L, L)
            future = torch.ones(length, length, dtype=torch.bool).triu(1)
            probs = logits.masked_fill(future, float("-inf")).softmax(-1)
            scores = score_visual(probs[:, :, rows][..., start:start + n], torch.ones(1, len(rows), dtype=torch.bool))
        h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=pos)
        if i in at:
            segment = sparsevlm_prune(h[:, start:start + n], scores, at[i]).tokens  # (1, kept + recycled, D)
            h = torch.cat([h[:, :start], segment, h[:, start + n:]], dim=1)
            rows = rows - (n - segment.shape[1])  # the raters sit after the image: they move down
            n = segment.shape[1]
    return stock.lm_head(lm.norm(h))[0, -1]


def test_sparsevlm_llm_stages_as_its_v15_code_runs_them(small_llava, images):
    """The last token's logits equal the re-derivation fed the same LLM input and raters (renumbered sequence,
    recycled tokens after the kept ones); keeping the positions (its v2.0's way) does not."""
    from ivtp.ops.sparsevlm import sparsevlm_schedule

    out = {}
    for positions in ("renumber", "keep"):
        model, processor = pruned(small_llava, {"method": "sparsevlm", "sparsevlm": {"budget": 64,
                                                                                   "positions": positions}})
        seen = {}
        model.model.language_model.register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"], guidance=kwargs["ivtp_guidance"]),
            with_kwargs=True)
        batch = batch_of(processor, images(1), ["Is the large red square left of the small blue circle?"])
        with torch.no_grad():
            out[positions] = model(**batch).logits[0, -1]
        visual = model.ivtp_state.last_llm_trace.visual_positions[0]
    stock, _ = small_llava()
    stages = [(st.layer, st.keep) for st in sparsevlm_schedule(64)]
    with torch.no_grad():
        expected = sparsevlm_llm_reference(stock, seen["embeds"], int(visual[0]), len(visual),
                                           seen["guidance"].text_select[0], stages)
    torch.testing.assert_close(out["renumber"], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["keep"], expected, rtol=1e-3, atol=1e-3)


def test_sparsevlm_at_llava15_geometry_follows_its_schedule(images):
    """On 576 patches and 32 layers, budget 64 keeps 66, 30, 17 at layers 2, 6, 15, plus recycled tokens:
    82 -> 32 -> 18 visual tokens (the authors' table)."""
    from ivtp.models import tiny_random

    model, processor = tiny_random()
    apply_pruning(model, {"method": "sparsevlm", "sparsevlm": {"budget": 64}})
    batch = processor(images=images(1, size=336), text=[prompt("What colour is the circle?")], return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    assert model.ivtp_state.row_report(0, 0, 1)["visual_tokens"] == [576, 82, 32, 18]
