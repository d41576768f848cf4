"""The rollout and scores of IVTP eqs. 2-4, against hand-computed cases."""

import pytest
import torch

from ivtp.ops import gtp_scores, head_mean_attention, rollout_query_row, value_norms

# Three layers of head-mean attention over 3 tokens (index 0 is the query, [CLS]). Rows sum to 1.
A1 = torch.tensor([[1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4], [0, 1 / 2, 1 / 2]], dtype=torch.float64)
A2 = torch.tensor([[1 / 2, 0, 1 / 2], [1 / 3, 1 / 3, 1 / 3], [1 / 4, 3 / 4, 0]], dtype=torch.float64)
A3 = torch.tensor([[0, 1 / 2, 1 / 2], [1 / 2, 1 / 2, 0], [1 / 2, 0, 1 / 2]], dtype=torch.float64)


def test_three_layer_rollout_worked_by_hand():
    # R = norm(A3 + I) norm(A2 + I) A1, row 0, by hand:
    #   e0 norm(A3 + I)       = ([0, 1/2, 1/2] + [1, 0, 0]) / 2                   = [1/2, 1/4, 1/4]
    #   norm(A2 + I) rows     = [3/4, 0, 1/4], [1/6, 2/3, 1/6], [1/8, 3/8, 1/2]
    #   [1/2, 1/4, 1/4] @ ... = [43/96, 25/96, 7/24]
    #   ... @ A1              = [37/128, 149/384, 31/96]
    row = rollout_query_row([A1[None], A2[None]], A3[0][None], query_index=0)
    expected = torch.tensor([[37 / 128, 149 / 384, 31 / 96]])
    torch.testing.assert_close(row, expected.float(), rtol=0, atol=1e-7)
    assert row.sum().item() == pytest.approx(1.0)


def test_scores_weight_the_row_by_value_norms_and_drop_the_query():
    row = torch.tensor([[37 / 128, 149 / 384, 31 / 96]])
    vnorm = torch.tensor([[5.0, 2.0, 1.0]])  # the query's own norm must not matter
    # S = [149/384 * 2, 31/96 * 1] / sum = [149/211, 62/211]
    torch.testing.assert_close(gtp_scores(row, vnorm, 0), torch.tensor([[149 / 211, 62 / 211]]))
    # A query at the end (the LLM's pseudo-CLS) drops the last column instead.
    torch.testing.assert_close(gtp_scores(row, torch.tensor([[2.0, 1.0, 7.0]]), -1),
                               torch.tensor([[(37 / 128 * 2) / (37 / 64 + 149 / 384), (149 / 384) / (37 / 64 + 149 / 384)]]))


def test_single_layer_group_is_that_layers_row():
    top = torch.softmax(torch.randn(2, 5), -1)
    torch.testing.assert_close(rollout_query_row([], top, 0), top)


def test_rollout_row_equals_the_full_matrix_product_on_random_attention():
    torch.manual_seed(1)
    b, n = 3, 7
    mats = [torch.softmax(torch.randn(b, n, n, dtype=torch.float64), -1) for _ in range(4)]
    eye = torch.eye(n, dtype=torch.float64)
    full = mats[0]
    for a in mats[1:]:
        full = ((a + eye) / 2) @ full  # rows of A + I sum to 2
    for q in (0, n - 1):
        row = rollout_query_row(mats[:-1], mats[-1][:, q], query_index=q)
        torch.testing.assert_close(row.double(), full[:, q], rtol=1e-5, atol=1e-6)


def test_head_mean_attention_and_value_norms():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    attn = head_mean_attention(q, k, 8 ** -0.5)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1).mean(1)
    torch.testing.assert_close(attn, expected)
    # Heads concatenated: the norm of the (H * Dh) vector of each token.
    torch.testing.assert_close(value_norms(v), v.permute(0, 2, 1, 3).reshape(2, 6, 32).norm(dim=-1))


def test_llm_rollout_with_the_pseudo_cls_last_worked_by_hand():
    # Two visual tokens v1, v2 and the pseudo-CLS p after them; causal attention, so rows are lower-triangular.
    a1 = torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 4, 1 / 4, 1 / 2]], dtype=torch.float64)
    a2_row_p = torch.tensor([[1 / 2, 1 / 4, 1 / 4]], dtype=torch.float64)
    # e_p norm(A2 + I) = ([1/2, 1/4, 1/4] + [0, 0, 1]) / 2 = [1/4, 1/8, 5/8]
    # ... @ A1 = [1/4 + 1/16 + 5/32, 1/16 + 5/32, 5/16] = [15/32, 7/32, 10/32]
    row = rollout_query_row([a1[None]], a2_row_p, query_index=-1)
    torch.testing.assert_close(row, torch.tensor([[15 / 32, 7 / 32, 10 / 32]]), rtol=0, atol=1e-7)
    # Eq. 4 drops the pseudo-CLS column: with ||V|| = (1, 3), S = [15/32, 21/32] / (36/32).
    torch.testing.assert_close(gtp_scores(row, torch.tensor([[1.0, 3.0, 9.0]]), -1),
                               torch.tensor([[15 / 36, 21 / 36]]))


def test_scores_drop_a_query_in_the_middle_too():
    # Row [0.1, 0.2, 0.3, 0.4] with ||V|| = [1, 2, 3, 4] and the query at index 1: the weights of the other three
    # are 0.1, 0.9, 1.6, so S = [0.1, 0.9, 1.6] / 2.6.
    row, vnorm = torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(gtp_scores(row, vnorm, 1), torch.tensor([[0.1, 0.9, 1.6]]) / 2.6)
