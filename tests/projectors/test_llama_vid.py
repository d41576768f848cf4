"""LLaMA-VID's context and content tokens: shapes, gradients, the instruction's effect, rows without text."""

import torch

from ivtp.projectors.llama_vid import LlamaVidProjector


def small(**kwargs):
    torch.manual_seed(0)
    return LlamaVidProjector(32, 48, num_tokens=16, num_patches=64, layers=2, **kwargs).eval()


def test_output_is_the_context_token_then_the_content_grid_and_gradients_flow():
    module = small().train()
    x = torch.randn(2, 64, 32, requires_grad=True)
    text = torch.randn(2, 5, 48)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = module(x, text, mask)  # (B, 1 + 16, Dl)
    assert out.shape == (2, 17, 48) and module.tokens_per_image == 17
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in module.parameters())
    assert module.text_queries.text_in.weight.grad.abs().sum() > 0  # the instruction reaches the context token


def test_the_instruction_moves_the_context_token_only():
    module = small()
    x = torch.randn(1, 64, 32)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        a = module(x, torch.randn(1, 4, 48), mask)
        b = module(x, torch.randn(1, 4, 48), mask)
    assert not torch.allclose(a[:, 0], b[:, 0])
    assert torch.equal(a[:, 1:], b[:, 1:])  # content tokens: the pooled grid alone


def test_padding_is_ignored_and_rows_without_text_run():
    module = small()
    x = torch.randn(3, 64, 32)
    text = torch.randn(3, 6, 48)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0] * 6, [1] * 6], dtype=torch.bool)
    with torch.no_grad():
        out = module(x, text, mask)
        padded = text.clone()
        padded[0, 3:] = 100.0  # what sits under the mask does not matter
        assert torch.allclose(module(x, padded, mask), out, atol=1e-5)
        alone = module(x[:1], text[:1, :3], mask[:1, :3])  # the same row without its padding
        assert torch.allclose(alone, out[:1], atol=1e-5)
        empty = module(x[1:2])  # no text at all: the learned queries alone
        assert torch.isfinite(out).all() and torch.allclose(empty, out[1:2], atol=1e-5)


def test_only_the_last_max_text_tokens_are_read():
    module = small(max_text=4)
    x = torch.randn(1, 64, 32)
    text = torch.randn(1, 7, 48)
    mask = torch.ones(1, 7, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(module(x, text, mask), module(x, text[:, -4:], mask[:, -4:]))
