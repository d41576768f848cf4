import pytest
import torch

from ivtp.ops import compose_indices, gather_tokens, keep_topk_sorted, linear_schedule


def test_linear_schedule_llava15():
    # 23 layers in groups of 3 -> 8 steps from 576 to 64.
    assert linear_schedule(576, 64, 8) == [512, 448, 384, 320, 256, 192, 128, 64]
    assert linear_schedule(576, 576, 3) == [576, 576, 576]
    assert linear_schedule(10, 3, 3)[-1] == 3
    with pytest.raises(ValueError):
        linear_schedule(10, 11, 2)
    with pytest.raises(ValueError):
        linear_schedule(10, 5, 0)


def test_topk_keeps_spatial_order_and_breaks_ties_low():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.05], [0.3, 0.3, 0.3, 0.3, 0.3]])
    assert keep_topk_sorted(scores, 3).tolist() == [[1, 2, 3], [0, 1, 2]]
    assert keep_topk_sorted(scores, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    with pytest.raises(ValueError):
        keep_topk_sorted(scores, 6)


def test_random_topk_is_the_top_set_sorted():
    torch.manual_seed(0)
    s = torch.rand(4, 50)
    idx = keep_topk_sorted(s, 9)
    assert torch.equal(idx, idx.sort(-1).values)
    for b in range(4):
        assert set(idx[b].tolist()) == set(s[b].topk(9).indices.tolist())


def test_gather_and_compose():
    x = torch.arange(2 * 5 * 3).view(2, 5, 3)
    idx = torch.tensor([[0, 4], [1, 2]])
    assert torch.equal(gather_tokens(x, idx), torch.stack([x[0, [0, 4]], x[1, [1, 2]]]))
    outer = torch.tensor([[3, 5, 9], [0, 1, 7]])
    assert compose_indices(outer, torch.tensor([[0, 2], [1, 2]])).tolist() == [[3, 9], [1, 7]]
