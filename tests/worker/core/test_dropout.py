import pytest
import torch

from hscr_worker.core.dropout import apply_dropout, keep_masks, mask_generator


def test_keep_masks_drop_exactly_the_ratio_and_are_seeded():
    masks = keep_masks(64, 0.7, 4, torch.Generator().manual_seed(3))
    assert masks.shape == (4, 64)
    assert (masks.sum(1) == 64 - round(0.7 * 64)).all()
    assert not torch.equal(masks[0], masks[1])  # independent masks
    again = keep_masks(64, 0.7, 4, torch.Generator().manual_seed(3))
    assert torch.equal(masks, again)


def test_ratio_one_drops_everything_and_tiny_ratio_drops_one():
    assert keep_masks(10, 1.0, 1, torch.Generator().manual_seed(0)).sum() == 0
    assert keep_masks(10, 0.01, 1, torch.Generator().manual_seed(0)).sum() == 9
    # below 1 a token always stays (round(9.9) would drop all ten: nothing left for `remove` to hand on)
    assert keep_masks(10, 0.99, 1, torch.Generator().manual_seed(0)).sum() == 1


def test_apply_dropout_remove_and_zero():
    visual = torch.arange(12.0).reshape(4, 3)
    keep = torch.tensor([True, False, True, False])
    removed = apply_dropout(visual, keep, "remove")
    assert torch.equal(removed, visual[[0, 2]])
    zeroed = apply_dropout(visual, keep, "zero")
    assert zeroed.shape == visual.shape
    assert torch.equal(zeroed[1], torch.zeros(3)) and torch.equal(zeroed[2], visual[2])
    assert visual[1].sum() > 0  # input untouched
    with pytest.raises(ValueError, match="dropout mode"):
        apply_dropout(visual, keep, "blur")


def test_mask_generator_depends_on_seed_and_item():
    a = torch.randperm(50, generator=mask_generator(0, "item-a"))
    assert torch.equal(a, torch.randperm(50, generator=mask_generator(0, "item-a")))
    assert not torch.equal(a, torch.randperm(50, generator=mask_generator(0, "item-b")))
    assert not torch.equal(a, torch.randperm(50, generator=mask_generator(1, "item-a")))
