"""The training-free control of the learned refiner: each side's largest connected component of the
teacher's foreground, with its holes filled.

A panoramic radiograph holds one maxillary sinus on each side of the midline, so what a weak
teacher adds besides the largest component of a side is a spurious blob, and a hole inside a
sinus is a miss. Pixels the post-processing changes get the teacher's own confidence with the
other sign, so the result is a set of logits like a refiner's (argmax and KD loss alike).
"""
import numpy as np
import torch
from scipy import ndimage

from .cyclegan import foreground_logit, with_foreground_logit


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (empty stays empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(sizes.argmax())


def largest_per_side(mask: np.ndarray) -> np.ndarray:
    """A boolean (H, W) mask cut at the middle column, the largest component of each half kept."""
    half = mask.shape[1] // 2
    return np.concatenate([largest_component(mask[:, :half]), largest_component(mask[:, half:])], axis=1)


def clean_foreground(mask: np.ndarray) -> np.ndarray:
    """`largest_per_side` of a boolean (H, W) foreground, then every hole of the result filled."""
    return ndimage.binary_fill_holes(largest_per_side(mask))


@torch.no_grad()
def postprocess_logits(images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Teacher logits whose foreground is `clean_foreground` of the teacher's; `images` are unused
    and taken so that this is called as a refiner is."""
    z = foreground_logit(teacher_logits)
    teacher = (z > 0)[:, 0].cpu().numpy()
    cleaned = torch.from_numpy(np.stack([clean_foreground(m) for m in teacher]))[:, None].to(z.device)
    return with_foreground_logit(teacher_logits, torch.where(cleaned == (z > 0), z, -z))
