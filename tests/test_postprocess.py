"""The training-free control: each side's largest component of the teacher's foreground, holes filled,
as logits that flip the sign exactly where the foreground changed."""
import numpy as np
import torch

from nets.postprocess import clean_foreground, largest_per_side, postprocess_logits


def two_sides():
    mask = np.zeros((12, 20), dtype=bool)
    mask[2:9, 1:7] = True          # the left sinus, with a hole
    mask[5, 3] = False
    mask[10:12, 8:10] = True       # a smaller blob on the left
    mask[3:6, 13:18] = True        # the right sinus
    mask[9, 17] = True             # a one-pixel blob on the right
    return mask


def test_each_side_keeps_its_largest_component_and_its_holes_are_filled():
    mask = two_sides()
    expected = np.zeros_like(mask)
    expected[2:9, 1:7] = True
    expected[5, 3] = False
    expected[3:6, 13:18] = True
    assert np.array_equal(largest_per_side(mask), expected)
    expected[5, 3] = True
    assert np.array_equal(clean_foreground(mask), expected)
    assert not largest_per_side(np.zeros_like(mask)).any()


def test_the_logits_flip_sign_where_the_foreground_changed_only():
    mask = torch.from_numpy(two_sides())
    confidence = torch.rand(1, *mask.shape, generator=torch.Generator().manual_seed(0)) + 0.1
    z = torch.where(mask, confidence, -confidence)          # the foreground logit of a 2-class teacher
    logits = torch.stack([torch.zeros_like(z), z], 1)
    out = postprocess_logits(None, logits)
    cleaned = torch.from_numpy(clean_foreground(mask.numpy()))
    assert torch.equal(out.argmax(1)[0] == 1, cleaned)
    changed = cleaned != mask
    margin = (out[:, 1] - out[:, 0])[0]
    torch.testing.assert_close(margin.abs(), confidence[0])   # the teacher's own confidence, either sign
    assert changed.sum() == 4 + 1 + 1 and torch.equal(margin > 0, cleaned)   # two blobs gone, a hole filled
