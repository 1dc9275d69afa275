"""Boundary metrics HD, HD95 and ASSD (SPEC sections 7 and 8): the API and the exact CPU path.

`boundary_metrics` checks its arguments and sends the batch to the Triton path
(`boundary_triton.py`: CUDA, or the interpreter; imported by the first call that takes it) or to
`boundary_metrics_cpu` below, as `dispatch.resolve_backend` decides.

Definitions: the boundary of a mask M is `M XOR erode(M)` with the 4-neighbour cross, pixels
outside the image counting as background. D_PG holds, for each boundary pixel of the prediction,
the Euclidean distance (scaled by the spacing (sy, sx)) to the nearest boundary pixel of the
target; D_GP likewise the other way. Then
    HD          = max(max D_PG, max D_GP)
    HD95        = max(P(D_PG), P(D_GP))   (MONAI's and DeepMind surface-distance's convention)
    HD95_pooled = P(D_PG ++ D_GP)         (MedPy's)
    ASSD        = mean(D_PG ++ D_GP)
with P the percentile interpolated linearly as numpy does. One pass over a case's distances gives
all four. Both masks empty gives 0 for all three;
exactly one empty gives NaN.

How the CPU path computes a case. Only the rows of the union bounding box are read twice (a
uint64 OR-reduction finds them): they are packed 64 pixels to a word, with a frame of zero words
and rows standing for the background beside them (outside the image, or outside both masks), so
the boundary's bits come out of a dozen word operations, exactly the boundary of the full mask,
including on the image border; the bits are unpacked only where a word holds some. The
nearest-boundary distances are then exact, by one of three equivalent means, whichever costs
least for the case:
- scipy's exact Euclidean distance transform of `~boundary` over the union box, read at the
  other mask's boundary pixels (what SPEC section 8 names): cost proportional to the crop's
  pixels, the cheaper for speckled masks whose boundaries fill the crop;
- an exact nearest-neighbour query (scipy KD-tree, eps=0) over the boundary pixel coordinates
  scaled by the spacing: cost proportional to the boundary pixels, about ten times more per
  point than the transform per pixel, so taken while the two boundaries hold fewer than a tenth
  of the crop's pixels (smooth masks: a sinus case's crop of ~350 000 pixels holds ~3 500);
- all pairwise distances, where the two boundaries make few pairs: cheaper than two trees.
Each gives, for each query pixel, the minimum over the other boundary's pixels of the spaced
Euclidean distance, so they agree to rounding (the tests run each against the oracles). The
metrics of a case are then numpy reductions of its two distance lists (`case_boundary_metrics`).
"""
import math
import numbers

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from .dispatch import resolve_backend

METRICS = ("hd", "hd95", "hd95_pooled", "assd")

# A KD-tree costs about ten times more per boundary point than the distance transform per pixel.
KD_TREE_POINTS_PER_PIXEL = 0.1
# Below this many (query, target) pairs all pairwise distances cost less than two trees.
BRUTE_FORCE_PAIRS = 1 << 15
# Unbalanced trees of 16-point leaves build and query ~15 % faster than scipy's defaults here.
KD_TREE_OPTIONS = dict(leafsize=16, balanced_tree=False)


def mask_boundary(masks):
    """Boundary of bool masks (..., H, W): `M XOR erode(M)`, 4-neighbour cross, outside = background.

    Takes numpy arrays (contour overlays; numpy runs on one thread, whereas torch's intra-op
    threads, on a busy 2-core machine, were seen to wait ~100 ms per image) or torch tensors.
    The CPU metrics compute the same bits from packed words (`_boundary_words`).
    """
    # pixels on the image edge have a neighbour outside, which is background: they keep M
    if isinstance(masks, np.ndarray):
        # in place into two buffers: M & ~interior is M > interior for bools
        interior = np.logical_and(masks[..., :-2, 1:-1], masks[..., 2:, 1:-1])
        interior &= masks[..., 1:-1, :-2]
        interior &= masks[..., 1:-1, 2:]
        boundary = np.empty_like(masks)
        for edge in (np.s_[..., :1, :], np.s_[..., -1:, :], np.s_[..., :, :1], np.s_[..., :, -1:]):
            boundary[edge] = masks[edge]
        np.greater(masks[..., 1:-1, 1:-1], interior, out=boundary[..., 1:-1, 1:-1])
        return boundary
    boundary = masks.clone()
    boundary[..., 1:-1, 1:-1] &= ~(masks[..., :-2, 1:-1] & masks[..., 2:, 1:-1]
                                   & masks[..., 1:-1, :-2] & masks[..., 1:-1, 2:])
    return boundary


def _any_along_rows(mask: np.ndarray) -> np.ndarray:
    """`mask.any(1)` of a bool (H, W) array, OR-ing eight pixels at a time where rows allow (a
    uint64 OR-reduction is ~2x faster than `any` on bools)."""
    if mask.strides[1] != 1 or mask.shape[1] % 8 or mask.strides[0] % 8:
        return mask.any(1)
    return np.bitwise_or.reduce(mask.view(np.uint64), axis=1) != 0


def _packed(mask: np.ndarray) -> np.ndarray:
    """A bool (H, W) mask as rows of little-endian uint64 words (bit i of word j is pixel 64 j + i),
    framed by a zero row above and below and a zero word left and right: the background outside
    the image. Packing is the one pass over the pixels (numpy packs eight to a byte with SIMD);
    the rest of a case runs on 64x fewer elements."""
    height, width = mask.shape
    framed = np.zeros((height + 2, 8 * (-(-width // 64) + 2)), dtype=np.uint8)
    framed[1:-1, 8:8 + -(-width // 8)] = np.packbits(mask, axis=1, bitorder="little")
    return framed.view("<u8")


def _boundary_words(framed: np.ndarray) -> np.ndarray:
    """`M AND NOT erode(M)` (4-neighbour cross) of framed packed rows, without the frame rows: the
    same bits as `mask_boundary`, the frame supplying the background neighbours outside the image.
    Row-major flat, a word's left and right neighbours are the words before and after it (a frame
    word at a row's ends), so every operand is one contiguous run; two buffers hold the results."""
    width = framed.shape[1]
    flat = framed.ravel()
    mask = flat[width:-width]
    one, last = np.uint64(1), np.uint64(63)
    interior = np.bitwise_and(flat[:-2 * width], flat[2 * width:])
    shifted = np.left_shift(mask, one)
    shifted |= flat[width - 1:-width - 1] >> last  # bit x holds pixel x - 1
    interior &= shifted
    np.right_shift(mask, one, out=shifted)
    shifted |= flat[width + 1:-width + 1] << last  # bit x holds pixel x + 1
    interior &= shifted
    # M AND NOT interior
    return np.bitwise_and(mask, ~interior, out=interior).reshape(-1, width)


def _word_points(words: np.ndarray) -> np.ndarray:
    """(N, 2) (y, x) coordinates, in row-major order, of the set bits of packed rows whose first
    word is the frame."""
    # numpy finds the nonzeros of a bool array several times faster than of any other dtype
    index = np.flatnonzero(words != 0)
    bits = np.flatnonzero(np.unpackbits(words.ravel()[index].view(np.uint8), bitorder="little").view(bool))
    index = index[bits >> 6]
    rows, columns = np.divmod(index, words.shape[1])
    return np.stack([rows, (columns - 1) * 64 + (bits & 63)], axis=1)


def _word_image(words: np.ndarray, x0: int, x1: int) -> np.ndarray:
    """Columns [x0, x1) of packed rows whose first word is the frame, as a bool image."""
    return np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, 64 + x0:64 + x1].view(bool)


def _nearest_distances(pred_words: np.ndarray, target_words: np.ndarray, spacing):
    """(D_PG, D_GP) between two packed boundaries of the union box's rows, each in row-major
    order of its pixels; inf if the other is empty."""
    pred_points, target_points = _word_points(pred_words), _word_points(target_words)
    if len(pred_points) == 0 or len(target_points) == 0:
        return np.full(len(pred_points), np.inf), np.full(len(target_points), np.inf)
    scale = np.asarray(spacing, dtype=np.float64)
    if len(pred_points) * len(target_points) <= BRUTE_FORCE_PAIRS:
        squared = (((pred_points[:, None, :] - target_points[None, :, :]) * scale) ** 2).sum(-1)
        return np.sqrt(squared.min(1)), np.sqrt(squared.min(0))
    # a mask's first and last pixel of a row are boundary pixels: the points span the union box
    x0 = min(pred_points[:, 1].min(), target_points[:, 1].min())
    x1 = max(pred_points[:, 1].max(), target_points[:, 1].max()) + 1
    if len(pred_points) + len(target_points) < KD_TREE_POINTS_PER_PIXEL * len(pred_words) * (x1 - x0):
        pred_points, target_points = pred_points * scale, target_points * scale
        return (cKDTree(target_points, **KD_TREE_OPTIONS).query(pred_points)[0],
                cKDTree(pred_points, **KD_TREE_OPTIONS).query(target_points)[0])
    pred_boundary, target_boundary = _word_image(pred_words, x0, x1), _word_image(target_words, x0, x1)
    return (ndimage.distance_transform_edt(~target_boundary, sampling=spacing)[pred_boundary],
            ndimage.distance_transform_edt(~pred_boundary, sampling=spacing)[target_boundary])


def case_distances(pred: np.ndarray, target: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(D_PG, D_GP) of one case of (H, W) bool masks, each in row-major order of its boundary pixels."""
    rows = np.flatnonzero(_any_along_rows(pred) | _any_along_rows(target))
    if rows.size == 0:
        return np.zeros(0), np.zeros(0)
    # only the union box's rows: the rows beside it are background, as the frame says
    rows = slice(rows[0], rows[-1] + 1)
    return _nearest_distances(_boundary_words(_packed(pred[rows])), _boundary_words(_packed(target[rows])), spacing)


def _percentile(values: np.ndarray, percentile: float) -> float:
    """`np.percentile(values, percentile)` (linear interpolation) of a non-empty 1-D array, with
    the same arithmetic as numpy's, so the same bits, from a partition instead of numpy's general
    machinery, which costs ~20 us a call before it starts."""
    position = (len(values) - 1) * (percentile / 100)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    part = np.partition(values, [low, high] if high > low else low)
    below, above = float(part[low]), float(part[high])
    gamma = position - low
    # numpy's _lerp: from the nearer end, so that gamma = 1 gives `above` exactly
    return above - (above - below) * (1 - gamma) if gamma >= 0.5 else below + (above - below) * gamma


def case_boundary_metrics(d_pg: np.ndarray, d_gp: np.ndarray, percentile: float) -> tuple:
    """(HD, HD95, HD95_pooled, ASSD) of one case from its two distance lists, with the empty-mask
    policy of the module docstring (an empty mask has an empty list: a mask with pixels has a
    boundary)."""
    if len(d_pg) == 0 and len(d_gp) == 0:
        return 0.0, 0.0, 0.0, 0.0
    if len(d_pg) == 0 or len(d_gp) == 0:
        return (float("nan"),) * 4
    both = np.concatenate([d_pg, d_gp])
    directed = max(_percentile(d_pg, percentile), _percentile(d_gp, percentile))
    return float(both.max()), directed, _percentile(both, percentile), float(both.mean())


def boundary_metrics_cpu(pred: torch.Tensor, target: torch.Tensor, spacing, percentile: float) -> dict:
    """The exact CPU path: batched (B, H, W) bool CPU masks -> {name of METRICS: float64 (B,) tensor}."""
    table = np.array([case_boundary_metrics(*case_distances(p, g, spacing), percentile)
                      for p, g in zip(pred.numpy(), target.numpy())], dtype=np.float64).reshape(len(pred), len(METRICS))
    return {name: torch.from_numpy(table[:, k]) for k, name in enumerate(METRICS)}


def _check_arguments(pred, target, spacing, percentile):
    for name, mask in (("pred", pred), ("target", target)):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"boundary_metrics: {name} must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"boundary_metrics: {name} must be a bool or integer mask, got {mask.dtype}")
    if pred.shape != target.shape or pred.ndim not in (2, 3) or pred.numel() == 0:
        raise ValueError(f"boundary_metrics: pred and target must be non-empty masks of one shape (H, W) or "
                         f"(B, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"boundary_metrics: pred is on {pred.device} but target on {target.device}")
    if (not isinstance(spacing, (tuple, list)) or len(spacing) != 2
            or not all(isinstance(s, numbers.Real) and math.isfinite(s) and s > 0 for s in spacing)):
        raise ValueError(f"boundary_metrics: spacing must be two positive numbers (sy, sx), got {spacing!r}")
    if not isinstance(percentile, numbers.Real) or not 0 <= percentile <= 100:
        raise ValueError(f"boundary_metrics: percentile must be a number in [0, 100], got {percentile!r}")


def boundary_metrics(pred: torch.Tensor, target: torch.Tensor, spacing=(1.0, 1.0), percentile: float = 95.0,
                     backend: str | None = None) -> dict:
    """Exact Hausdorff distance, percentile Hausdorff distance and average symmetric surface distance.

    pred, target: bool or integer masks (nonzero = foreground) of shape (B, H, W) or (H, W).
    spacing: pixel size (sy, sx).
    backend: None picks by device (see `kernels.dispatch`); "torch" forces the CPU path,
    "triton"/"interpret" the Triton path.
    Returns {"hd", "hd95", "hd95_pooled", "assd"} (hd95 the larger of the two directed percentiles,
    as MONAI and DeepMind surface-distance; hd95_pooled the percentile of both directions together,
    as MedPy): float64 CPU tensors of shape (B,), or 0-d for (H, W) input;
    0 where both masks are empty, NaN where exactly one is.
    """
    _check_arguments(pred, target, spacing, percentile)
    single = pred.ndim == 2
    pred, target = (pred[None], target[None]) if single else (pred, target)
    pred, target = (m if m.dtype == torch.bool else m != 0 for m in (pred, target))
    spacing = (float(spacing[0]), float(spacing[1]))
    if resolve_backend(backend, pred) == "torch":
        result = boundary_metrics_cpu(pred.cpu(), target.cpu(), spacing, float(percentile))
    else:
        from .boundary_triton import boundary_metrics_triton  # Triton is optional: imported on first use
        result = boundary_metrics_triton(pred, target, spacing, float(percentile))
    return {name: value[0] if single else value for name, value in result.items()}
