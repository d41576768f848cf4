"""Stage 2 on the real transformers LLaVA/Llama classes: pseudo-CLS guidance, in-LLM pruning, exact decoding."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import assert_cache_matches_recompute, assert_static_cache_matches_dynamic, batch_of
from ivtp import ConfigError, apply_pruning
from ivtp.models import tiny_aligner
from ivtp.names import ALIGNER_FILE
from ivtp.ops import gtp_scores, head_mean_attention, rollout_query_row, value_norms

N = 64  # patches of the 112 px test model


def stage2(vision=None, **llm):
    """576-style geometry scaled down: 64 patches -> 32 in the ViT -> 8 by LLM layer 6 (groups 0-2, 3-5)."""
    llm = {"layers": 6, "group_size": 3, "keep": 8, **llm}
    return {"vision": {"keep": 32, **(vision or {})}, "llm": llm}


def pruned(small_llava, config, seed=0):
    model, processor = small_llava(seed)
    apply_pruning(model, config, aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    return model, processor


QUESTIONS = ["What colour is the circle?", "Is there a large red square at the top left of the image?", "Hello"]


def test_keep_all_in_both_stages_equals_the_stock_model(small_llava, images):
    stock, processor = small_llava()
    model, _ = pruned(small_llava, {"vision": {"keep": 1.0}, "llm": {"keep": 1.0, "layers": 6, "tau": -1.0}})
    batch = batch_of(processor, images(2) + [None], QUESTIONS, padding_side="left")
    with torch.no_grad():
        ref = stock(**batch).logits
        out = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=1e-5)
    assert [g["pseudo_cls_source"] for g in (r.to_json() for r in model.ivtp_state.last_guidance[:2])] == ["text"] * 2
    assert model.ivtp_state.last_llm_trace.counts == [[N, N, N], [N, N, N], []]


def test_output_attentions_lists_every_layer(small_llava, images):
    """The scored layers return their attention weights like the stock ones (eager): with keep-all, layer by layer
    the same maps as the stock model; pruned, one map per layer, as wide as that layer's sequence."""
    stock, processor = small_llava()
    keep_all, _ = pruned(small_llava, {"vision": {"keep": 1.0}, "llm": {"keep": 1.0, "layers": 6, "tau": -1.0}})
    model, _ = pruned(small_llava, stage2(tau=-1.0))
    for m in (stock, keep_all, model):
        m.config.text_config._attn_implementation = "eager"
    batch = batch_of(processor, images(2), QUESTIONS[:2])
    with torch.no_grad():
        ref, same, out = (m(**batch, output_attentions=True, output_hidden_states=True)
                          for m in (stock, keep_all, model))
    layers = stock.config.text_config.num_hidden_layers
    assert len(ref.attentions) == len(same.attentions) == len(out.attentions) == layers
    real = batch["attention_mask"].bool()  # a left-padding query's row is never read, and the two fill it apart
    for a, b in zip(same.attentions, ref.attentions):
        torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], rtol=0, atol=1e-6)
    # Layer l attends over the tokens that enter it, as wide as its output hidden_states[l + 1] (the pruning comes
    # after the layer; the last entry is the final output, put back at full length). The first 6 layers are
    # scored, 3 per group.
    widths = [h.shape[1] for h in out.hidden_states[1:layers]]
    assert [a.shape[-1] for a in out.attentions[:-1]] == widths
    assert widths[0] > widths[3] > widths[6] == widths[-1]


def test_kv_cache_holds_exactly_the_kept_tokens_and_never_the_pseudo_cls(small_llava, images):
    model, processor = pruned(small_llava, stage2(tau=-1.0))
    batch = batch_of(processor, images(1), QUESTIONS[:1])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    length = batch["input_ids"].shape[1] - (N - 32)  # after stage 1
    cache = out.past_key_values
    lengths = [cache.get_seq_length(layer) for layer in range(32)]
    # Layers 0-2 see all 32 visual tokens, 3-5 the 20 left after group 0, 6-31 the 8 left after group 1.
    assert lengths == [length] * 3 + [length - 12] * 3 + [length - 24] * 26
    assert out.logits.shape[1] == length  # the output keeps every position
    assert model.ivtp_state.last_llm_trace.counts == [[32, 20, 8]]


@pytest.mark.parametrize("tau", [-1.0, 0.2, 1.0])
def test_greedy_generation_with_cache_equals_recomputation(small_llava, images, tau):
    model, processor = pruned(small_llava, stage2(tau=tau))
    batch = batch_of(processor, images(2) + [None], QUESTIONS)
    assert_cache_matches_recompute(model, batch, new_tokens=10)


def test_one_unpadded_row_on_sdpa_drops_the_mask_and_matches_eager(small_llava, images, monkeypatch):
    """With no padding and no fillers the pruned layers pass SDPA no mask (its causal kernel): the same logits and
    kept tokens as eager attention, which gets the explicit mask; and the cache still decodes exactly."""
    from ivtp.patch import llama

    built = []
    real_prefill_mask = llama._prefill_mask
    monkeypatch.setattr(llama, "_prefill_mask", lambda *a: built.append(1) or real_prefill_mask(*a))
    runs = {}
    for impl in ("sdpa", "eager"):
        model, processor = small_llava()
        model.config.text_config._attn_implementation = impl
        apply_pruning(model, stage2(tau=-1.0), aligner=tiny_aligner(), tokenizer=processor.tokenizer)
        batch = batch_of(processor, images(1), QUESTIONS[1:2])
        built.clear()
        with torch.no_grad():
            runs[impl] = model(**batch).logits, model.ivtp_state.last_llm_trace.kept_positions[0], len(built)
        if impl == "sdpa":
            assert_cache_matches_recompute(model, batch, new_tokens=6)
    (sdpa, kept_sdpa, masks_sdpa), (eager, kept_eager, masks_eager) = runs["sdpa"], runs["eager"]
    assert masks_sdpa == 0 and masks_eager == 2  # one explicit mask per pruning group, eager only
    assert torch.equal(kept_sdpa, kept_eager)
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)


def test_unpadded_decoding_on_sdpa_builds_no_masks_and_matches_eager(small_llava, images, monkeypatch):
    """One new token, no padding, no fillers: the pruned layers decode without a mask, as the stock layers do; a
    padded batch still gets its masks. Same greedy tokens and logits as eager attention, which always masks."""
    from ivtp.patch import llama

    built = []
    real_decode_mask = llama._decode_mask
    monkeypatch.setattr(llama, "_decode_mask", lambda *a: built.append(1) or real_decode_mask(*a))
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    runs = {}
    for impl in ("sdpa", "eager"):
        model, processor = small_llava()
        model.config.text_config._attn_implementation = impl
        apply_pruning(model, stage2(tau=-1.0), aligner=tiny_aligner(), tokenizer=processor.tokenizer)
        built.clear()
        with torch.no_grad():
            out = model.generate(**batch_of(processor, images(1), QUESTIONS[1:2]), **kwargs)
        runs[impl] = out, len(built)
        if impl == "sdpa":  # a left-padded batch: its masks are still built
            built.clear()
            with torch.no_grad():
                model.generate(**batch_of(processor, images(2), QUESTIONS[:2]), **kwargs)
            assert len(built) > 0
    (sdpa, masks_sdpa), (eager, masks_eager) = runs["sdpa"], runs["eager"]
    # Eager: 4 decode steps (the first new token comes from the prefill) x 2 pruned segments.
    assert masks_sdpa == 0 and masks_eager == 4 * 2
    assert torch.equal(sdpa.sequences, eager.sequences)
    for a, b in zip(sdpa.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("rows", [1, 3])
def test_static_cache_generation_equals_the_dynamic_cache(small_llava, images, impl, rows):
    """A static cache hands each layer's attention every preallocated slot, so the pruned layers' masks must hide
    the slots past their own, shorter, segment: in the prefill and at each decode step. One unpadded row (SDPA
    takes no mask in the prefill) and a left-padded batch with a text-only row."""
    model, processor = small_llava()
    model.config.text_config._attn_implementation = impl
    apply_pruning(model, stage2(), aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    batch = batch_of(processor, (images(2) + [None])[:rows], QUESTIONS[:rows])
    assert_static_cache_matches_dynamic(model, batch, new_tokens=8)


def test_generate_keeps_the_in_llm_stage_eager_unless_asked(small_llava, images, monkeypatch):
    """With a static cache, generate would compile the decoder by itself on a GPU; the in-LLM stage's host-side
    segment logic would recompile at every step, so it is left eager unless the caller says disable_compile=False."""
    from transformers.generation.utils import GenerationMixin

    seen = []
    real = GenerationMixin._valid_auto_compile_criteria
    monkeypatch.setattr(GenerationMixin, "_valid_auto_compile_criteria",
                        lambda self, kw, cfg: seen.append(cfg.disable_compile) or real(self, kw, cfg))
    model, processor = pruned(small_llava, stage2())
    batch = batch_of(processor, images(1), QUESTIONS[:1])
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False, cache_implementation="static")
        model.generate(**batch, max_new_tokens=3, do_sample=False, cache_implementation="static",
                       disable_compile=False)
    assert seen and seen[0] is True and seen[-1] is False


@pytest.mark.parametrize("config", [stage2(), {"method": "topk", "topk": {"keep": 16}}], ids=["ivtp", "topk"])
def test_opting_into_the_compiled_static_decoder_gives_the_same_tokens(small_llava, images, config):
    """disable_compile=False lets generate compile the decode step (forced on here, on a CPU, with dynamo's eager
    backend: the tracing, not a kernel compiler). generate builds the pruned segments' masks ahead of each step,
    so every step of a padded batch is one full graph, traced once, and the tokens and logits stay those of the
    eager dynamic-cache run. A vision-only method gets the stock masks, as an unpruned model does."""
    from transformers.generation.configuration_utils import CompileConfig

    model, processor = pruned(small_llava, config)
    batch = batch_of(processor, images(2), QUESTIONS[:2])
    compile_config = CompileConfig(backend="eager", mode=None, fullgraph=True)  # a graph break would raise
    compile_config._compile_all_devices = True  # generate compiles only on accelerators otherwise
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        with torch.no_grad():
            ref = model.generate(**batch, **kwargs)
            out = model.generate(**batch, cache_implementation="static", disable_compile=False,
                                 compile_config=compile_config, **kwargs)
        assert counters["stats"]["unique_graphs"] == 1  # traced once, for all 5 decode steps
    finally:
        torch._dynamo.reset()
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_reused_cache_forgets_the_last_prompts_pruned_segments(small_llava, images):
    """A cache reused after reset() for a text-only prompt must decode as a fresh one: the pruned segments of the
    image prompt before it no longer apply."""
    from transformers import StaticCache

    model, processor = pruned(small_llava, stage2())
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    text = batch_of(processor, [None], ["Say hello to the square"])
    with torch.no_grad():
        fresh = model.generate(**text, **kwargs)
        for cache in (None, StaticCache(config=model.config, max_cache_len=128)):
            first = model.generate(**batch_of(processor, images(1), QUESTIONS[:1]), past_key_values=cache, **kwargs)
            cache = first.past_key_values
            cache.reset()
            again = model.generate(**text, past_key_values=cache, **kwargs)
            assert torch.equal(again.sequences, fresh.sequences)
            for a, b in zip(again.logits, fresh.logits):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_model_split_inside_the_pruning_layers_is_refused(small_llava, images):
    """device_map may spread the decoder over GPUs, but the layers up to the last pruning step must share the
    embeddings' device (the slot bookkeeping lives there). Faked with accelerate's hook attribute."""
    from types import SimpleNamespace

    model, processor = pruned(small_llava, stage2())
    batch = batch_of(processor, images(1), QUESTIONS[:1])
    layers = model.model.language_model.layers
    layers[20]._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(execution_device=1)])  # after layer 5: allowed
    with torch.no_grad():
        model(**batch)
    layers[4]._hf_hook = SimpleNamespace(execution_device=1)
    with pytest.raises(ValueError, match=r"decoder layers 0-5 on the device of the input embeddings \(cpu\).*4: cuda:1"):
        with torch.no_grad():
            model(**batch)


def test_left_padded_batch_equals_single_samples(small_llava, images):
    model, processor = pruned(small_llava, stage2(tau=-1.0))
    imgs = images(2) + [None]
    with torch.no_grad():
        batch = batch_of(processor, imgs, QUESTIONS)
        together = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, -8:]
        batch_report = [model.ivtp_state.row_report(r, r, 1) for r in range(2)]
        last = model(**batch).logits[:, -1]
        for i in range(3):
            single = batch_of(processor, [imgs[i]], [QUESTIONS[i]])
            alone = model.generate(**single, max_new_tokens=8, do_sample=False)[:, -8:]
            assert torch.equal(together[i], alone[0]), f"sample {i}"
            if imgs[i] is not None:  # the same patches survive both stages
                assert model.ivtp_state.row_report(0, 0, 1)["kept_patches"] == batch_report[i]["kept_patches"]
            torch.testing.assert_close(model(**single).logits[0, -1], last[i], rtol=1e-4, atol=1e-4)


def test_tau_above_every_relevance_takes_the_visual_cls_fallback(small_llava, images):
    guided, processor = pruned(small_llava, stage2(tau=1.0))
    plain, _ = pruned(small_llava, stage2(guidance="none"))
    batch = batch_of(processor, images(2), QUESTIONS[:2])
    with torch.no_grad():
        guided(**batch)
        plain(**batch)
    reports = [g.to_json() for g in guided.ivtp_state.last_guidance]
    assert [r["pseudo_cls_source"] for r in reports] == ["visual", "visual"]
    assert all(r["selected_tokens"] == [] and r["instruction_tokens"] for r in reports)
    for a, b in zip(guided.ivtp_state.last_llm_trace.scores, plain.ivtp_state.last_llm_trace.scores):
        torch.testing.assert_close(a, b)


def test_an_instruction_without_text_falls_back(small_llava, images):
    model, processor = pruned(small_llava, stage2(tau=-1.0))
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images(1), text=["USER: describe <image>"], return_tensors="pt")  # nothing after it
    with torch.no_grad():
        model(**batch)
    report = model.ivtp_state.last_guidance[0].to_json()
    assert report["pseudo_cls_source"] == "visual" and report["instruction_tokens"] == []


def test_first_group_scores_match_a_reference_from_the_stock_layers(small_llava, images):
    """Recompute eq. 3-4 for LLM layers 0-2 from the stock model's hidden states and weights: the pseudo-CLS is
    the mean of the selected tokens' hidden states at each layer, placed right after the last visual token."""
    model, processor = pruned(small_llava, {"vision": {"enabled": False}, "llm": {"layers": 3, "keep": 16,
                                                                                   "tau": -1.0}})
    stock, _ = small_llava()
    batch = batch_of(processor, images(1), QUESTIONS[:1])
    with torch.no_grad():
        model(**batch)
        hidden = stock(**batch, output_hidden_states=True).hidden_states  # [embeddings, layer 0 out, ...]
    selected = [t["position"] for t in model.ivtp_state.last_guidance[0].to_json()["selected_tokens"]]
    vis = torch.nonzero(batch["input_ids"][0] == stock.config.image_token_id).flatten()
    lm = stock.model.language_model
    rows, vnorm = [], None
    with torch.no_grad():
        for layer_idx in range(3):
            layer = lm.layers[layer_idx]
            h = hidden[layer_idx][0]  # input of this layer, (L, D)
            tokens = torch.cat([h[vis], h[selected].mean(0, keepdim=True)])  # (Nv + 1, D)
            positions = torch.cat([vis, vis[-1:] + 1])[None]
            x = layer.input_layernorm(tokens)[None]
            q = layer.self_attn.q_proj(x).view(1, -1, 4, 16).transpose(1, 2)
            k = layer.self_attn.k_proj(x).view(1, -1, 4, 16).transpose(1, 2)
            cos, sin = lm.rotary_emb(x, positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            n = q.shape[2]
            causal = torch.where(torch.ones(n, n).tril().bool(), 0.0, float("-inf"))
            rows.append(head_mean_attention(q, k, 16 ** -0.5, causal)[0])  # (Nv + 1, Nv + 1)
            v = layer.self_attn.v_proj(x).view(1, -1, 4, 16).transpose(1, 2)
            vnorm = value_norms(v)  # (1, Nv + 1)
    row = rollout_query_row([rows[0][None], rows[1][None]], rows[2][-1][None], query_index=-1)
    expected = gtp_scores(row, vnorm, query_index=-1)
    torch.testing.assert_close(model.ivtp_state.last_llm_trace.scores[0], expected, rtol=1e-4, atol=1e-6)


def test_training_forward_loss_and_gradients(small_llava, images):
    model, processor = pruned(small_llava, stage2(tau=-1.0))
    model.train()
    batch = batch_of(processor, images(1) + [None], ["What is it?", "Hi"], padding_side="right")
    labels = torch.full_like(batch["input_ids"], -100)
    answer = batch["attention_mask"].sum(1) - 3  # supervise the last three real tokens of each row
    for b in range(2):
        labels[b, answer[b] : answer[b] + 3] = batch["input_ids"][b, answer[b] : answer[b] + 3]
    out = model(**batch, labels=labels)
    # The output keeps every position, so the stage-1-shrunk labels line up with the logits.
    shrunk = model.ivtp_state.shrink(batch["input_ids"], 1, batch["attention_mask"], labels, "right").labels
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), shrunk[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    grads = [p.grad for p in model.model.language_model.layers[10].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # The supervised answer is never part of the instruction that builds the pseudo-CLS.
    chosen = [t["position"] for t in model.ivtp_state.last_guidance[0].to_json()["instruction_tokens"]]
    first_label = int((shrunk[0] != -100).nonzero()[0])
    assert chosen and max(chosen) < first_label


@pytest.mark.parametrize("variant", [{"aggregation": "mean"}, {"aggregation": "max"}, {"aggregation": "multiply"},
                                     {"aggregation": "single_layer"}, {"aggregation": "layer_wise"},
                                     {"guidance": "all_text"}, {"guidance": "llm_threshold", "tau": 0.0},
                                     {"guidance": "none"}])
def test_ablation_variants_run_and_reach_the_budget(small_llava, images, variant):
    model, processor = pruned(small_llava, stage2(**variant))
    batch = batch_of(processor, images(2), QUESTIONS[:2])
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    counts = model.ivtp_state.last_llm_trace.counts
    assert all(c[0] == 32 and c[-1] == 8 for c in counts)
    assert len(counts[0]) == (7 if variant.get("aggregation") == "layer_wise" else 3)


def test_stage2_bad_input(small_llava, images):
    model, processor = small_llava(image_size=112, hidden_size=48)
    with pytest.raises(ConfigError, match="aligner.*32.*48 wide"):
        apply_pruning(model, stage2(), aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    model, processor = small_llava()
    with pytest.raises(ValueError, match="pass the LLM tokenizer"):
        apply_pruning(model, stage2(), aligner=tiny_aligner())
    from test_aligner import llama_style_tokenizer

    with pytest.raises(ValueError, match="tokenizer mismatch"):
        apply_pruning(model, stage2(), aligner=tiny_aligner(), tokenizer=llama_style_tokenizer())
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="sdpa or eager"):
        apply_pruning(model, stage2(), aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    assert not hasattr(model, "ivtp_state")
    model, processor = pruned(small_llava, stage2())
    batch = batch_of(processor, images(1), QUESTIONS[:1])
    with pytest.raises(ValueError, match="beam search"):
        model.generate(**batch, num_beams=2, max_new_tokens=2)


def test_saved_checkpoint_reloads_with_both_stages(small_llava, images, tmp_path):
    from ivtp import load_pruned

    model, processor = pruned(small_llava, stage2(tau=-1.0))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # The aligner handed to apply_pruning is carried beside the weights; the saved config names that file.
    assert (tmp_path / ALIGNER_FILE).is_file()
    loaded = load_pruned(str(tmp_path)).eval()  # tokenizer and aligner from the folder
    batch = batch_of(processor, images(1), QUESTIONS[:1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    saved, ran = loaded.ivtp_state.config.to_dict(), model.ivtp_state.config.to_dict()
    assert saved["llm"].pop("aligner") == {"model": "ivtp-tiny-clip", "pretrained": ALIGNER_FILE}
    ran["llm"].pop("aligner")
    assert saved == ran
