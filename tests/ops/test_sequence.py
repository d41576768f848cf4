import pytest
import torch

from ivtp.ops.sequence import PlaceholderError, check_placeholders, infer_padding_side, shrink_placeholders

I = 9  # image token id
P = 0  # pad id


def test_shrink_left_padded_batch_with_text_only_row():
    ids = torch.tensor([[P, 5, I, I, I, I, 6], [5, 6, 7, 8, 8, 4, 3]])
    mask = (ids != P).long()
    out = shrink_placeholders(ids, I, full=4, kept=2, attention_mask=mask, padding_side="left")
    # Row 0 loses 2 placeholders, row 1 none: row 0 is re-padded on the left.
    assert out.input_ids.tolist() == [[P, P, P, 5, I, I, 6], [5, 6, 7, 8, 8, 4, 3]]
    assert out.attention_mask.tolist() == [[0, 0, 0, 1, 1, 1, 1], [1] * 7]


def test_shrink_right_padded_labels_and_two_images_per_row():
    ids = torch.tensor([[1, I, I, I, 2, I, I, I, 3], [1, I, I, I, 4, P, P, P, P]])
    mask = (ids != P).long()
    labels = torch.tensor([[-100] * 8 + [3], [-100] * 4 + [4, -100, -100, -100, -100]])
    out = shrink_placeholders(ids, I, full=3, kept=1, attention_mask=mask, labels=labels, padding_side="right")
    assert out.input_ids.tolist() == [[1, I, 2, I, 3], [1, I, 4, P, P]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out.labels.tolist() == [[-100, -100, -100, -100, 3], [-100, -100, 4, -100, -100]]


def test_keep_all_is_a_no_op():
    ids = torch.tensor([[1, I, I, 2]])
    out = shrink_placeholders(ids, I, full=2, kept=2)
    assert out.input_ids is ids and out.keep is None


def test_unequal_rows_without_mask_get_one():
    ids = torch.tensor([[I, I, 1], [2, 3, 4]])
    out = shrink_placeholders(ids, I, full=2, kept=1)
    assert out.input_ids.tolist() == [[I, 1, 0], [2, 3, 4]]
    assert out.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_check_placeholders():
    check_placeholders(torch.tensor([4, 0, 8]), 3, 4)
    check_placeholders(torch.tensor([2, 0, 4]), 3, 2)
    with pytest.raises(PlaceholderError, match="2 image"):
        check_placeholders(torch.tensor([4, 0]), 2, 4)  # an image without a placeholder
    with pytest.raises(PlaceholderError):
        check_placeholders(torch.tensor([4, 4]), 1, 4)  # a placeholder without an image
    with pytest.raises(PlaceholderError):
        check_placeholders(torch.tensor([3, 5]), 2, 4)  # a broken run


def test_infer_padding_side():
    assert infer_padding_side(torch.tensor([[0, 1], [1, 1]])) == "left"
    assert infer_padding_side(torch.tensor([[1, 0], [1, 1]])) == "right"
    assert infer_padding_side(torch.tensor([[1, 1]]), default="left") == "left"
    assert infer_padding_side(None) == "right"


# ---- per-image counts (LLaVA-NeXT: each image's run has its own length) ---------------------------------------
def test_per_image_counts_shrink_each_run_to_its_own_length():
    # row 0: text, image A (3 placeholders), text, image B (2); row 1: image C (4); per-image kept 1, 2, 3
    ids = torch.tensor([[5, I, I, I, 6, I, I, 7, 0],
                        [I, I, I, I, 8, 4, 0, 0, 0]])
    mask = (torch.arange(9)[None] < torch.tensor([[8], [6]])).long()
    out = shrink_placeholders(ids, I, full=torch.tensor([3, 2, 4]), kept=torch.tensor([1, 2, 3]),
                              attention_mask=mask, padding_side="right")
    assert out.input_ids.tolist() == [[5, I, 6, I, I, 7], [I, I, I, 8, 4, 0]]
    assert out.attention_mask.tolist() == [[1] * 6, [1] * 5 + [0]]


def test_per_image_counts_equal_to_full_change_nothing():
    ids = torch.tensor([[I, I, 5], [I, 6, 7]])
    out = shrink_placeholders(ids, I, full=torch.tensor([2, 1]), kept=torch.tensor([2, 1]))
    assert out.keep is None and out.input_ids is ids


def test_per_image_check_wants_whole_runs_per_row():
    check_placeholders(torch.tensor([5, 0, 4]), 3, torch.tensor([3, 2, 4]))
    check_placeholders(torch.tensor([3, 6]), 3, torch.tensor([3, 2, 4]))  # B and C share row 1
    with pytest.raises(PlaceholderError, match=r"3\+2\+4 = 9"):
        check_placeholders(torch.tensor([4, 5]), 3, torch.tensor([3, 2, 4]))  # row 0 ends inside image B's run
    with pytest.raises(PlaceholderError):
        check_placeholders(torch.tensor([5, 4]), 2, torch.tensor([3, 2, 4]))  # an image too many
