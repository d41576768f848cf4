"""Qwen-VL's resampler: shapes, gradients, its 2-D sin-cos tables, and one cross-attention layer as Qwen-VL
computes it (torch's nn.MultiheadAttention on the same weights)."""

import math

import torch
from conftest import assert_trains
from torch import nn

from ivtp.projectors.qwen_vl import QwenVLResampler, resize_table, sincos_2d


def test_output_shape_and_gradients_reach_every_trained_parameter():
    module = assert_trains(QwenVLResampler(32, 48, num_tokens=16, num_patches=64), torch.randn(3, 64, 32), tokens=16,
                           out_dim=48)
    assert not {"query_pos", "key_pos"} & set(module.state_dict())  # fixed tables are rebuilt, not saved


def test_sincos_table_encodes_column_then_row():
    table = sincos_2d(8, 3)  # (9, 8): 4 for the column, 4 for the row
    row, col = 2, 1
    expected_col = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    expected_row = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    torch.testing.assert_close(table[row * 3 + col], torch.tensor(expected_col + expected_row))
    assert torch.equal(resize_table(table, 3), table)
    assert resize_table(table, 6).shape == (36, 8)


def test_cross_attention_equals_torch_multihead_attention_with_qwen_vls_inputs():
    torch.manual_seed(0)
    module = QwenVLResampler(32, 48, num_tokens=16, num_patches=64, heads=4).eval()
    reference = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    attn = module.attn
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        reference.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        reference.out_proj.weight.copy_(attn.out.weight)
        reference.out_proj.bias.copy_(attn.out.bias)
        x = torch.randn(2, 64, 32)
        kv = module.ln_kv(x)  # kv_proj is the identity at the tower's width
        q = module.ln_q(module.query)[None].expand(2, -1, -1)
        pos_k = resize_table(sincos_2d(32, 4), 8)  # the query table, bicubic to the 8 x 8 patch grid
        out, _ = reference(q + sincos_2d(32, 4), kv + pos_k, kv)
        expected = module.readout(module.ln_post(out) @ module.proj)
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
