"""Per-case segmentation metrics of SPEC section 7 and their summaries.

Overlap metrics (Dice, IoU, precision, recall) on binary masks; boundary metrics (HD, HD95 in
both conventions, ASSD) from `kernels.boundary_metrics`. With several classes each class is scored
one-vs-rest (`dice[left sinus]`) and a metric's plain name is its mean over the classes; a binary
dataset has its one class's metrics under the plain names. Conventions for empty masks: both empty
gives Dice = IoU = precision = recall = 1 and zero boundary errors; an empty prediction or an
empty ground truth alone gives 0 for the overlap ratio whose denominator is empty and NaN
(undefined) boundary errors.
"""
import math

import numpy as np
import torch

from kernels import boundary_metrics

OVERLAP = ("dice", "iou", "precision", "recall")
SPACING_COLUMNS = ("spacing_row_mm", "spacing_col_mm", "spacing_source")
BOUNDARY = ("hd", "hd95", "hd95_pooled", "assd")
METRICS = OVERLAP + BOUNDARY


def _ratio(num: torch.Tensor, den: torch.Tensor, both_empty: torch.Tensor) -> torch.Tensor:
    out = torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))
    return torch.where(both_empty, torch.ones_like(out), out)


def overlap_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Batched (B, H, W) boolean masks -> per-case float64 tensors."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    tp = (pred & target).sum(1).double()
    p, g = pred.sum(1).double(), target.sum(1).double()
    both_empty = (p == 0) & (g == 0)
    return dict(dice=_ratio(2 * tp, p + g, both_empty), iou=_ratio(tp, p + g - tp, both_empty),
                precision=_ratio(tp, p, both_empty), recall=_ratio(tp, g, both_empty))


def binary_mask_metrics(pred: torch.Tensor, target: torch.Tensor, spacing=(1.0, 1.0)) -> dict:
    """Every metric of METRICS for one or more same-sized binary cases (B, H, W) -> {name: list of
    floats, one a case}."""
    out = overlap_metrics(pred, target)
    out.update(boundary_metrics(pred, target, spacing=spacing))
    return {k: out[k].cpu().double().tolist() for k in METRICS}


def per_class(metric: str, name: str) -> str:
    return f"{metric}[{name}]"


def class_metrics(pred: torch.Tensor, target: torch.Tensor, names, spacing=(1.0, 1.0)) -> dict:
    """All metrics of one or more same-sized cases (B, H, W) of class indices 1..len(names) -> {name:
    list of floats}: of a single class under the plain names, of several each class's."""
    if len(names) == 1:
        return binary_mask_metrics(pred == 1, target == 1, spacing)
    out = {}
    for c, name in enumerate(names, 1):
        out.update({per_class(k, name): v for k, v in binary_mask_metrics(pred == c, target == c, spacing).items()})
    return out


def class_means(metrics: dict, names) -> dict:
    """Each metric's mean over the classes `names` of class_metrics' result with several classes
    (undefined where any class's is)."""
    return {k: np.mean([metrics[per_class(k, n)] for n in names], axis=0).tolist() for k in METRICS}


def case_spacing(explicit, header):
    """(row mm, column mm, source) of one case: the explicit --spacing (a pair), else what its DICOM
    header states (data.Dataset.spacing), else None (no physical size known: pixels)."""
    return (*explicit, "--spacing") if explicit is not None else header


def spacing_columns(spacing) -> dict:
    """The SPACING_COLUMNS of a per-case CSV row for case_spacing's result."""
    if spacing is None:
        return dict(spacing_row_mm="", spacing_col_mm="", spacing_source="none (pixels)")
    return dict(zip(SPACING_COLUMNS, spacing))


def case_statistics(values, penalty=None) -> dict:
    """mean, std, median over the defined values; n and n_undefined; with `penalty` (a number or one
    per case), also the mean with each undefined value replaced by it (the image diagonal, for
    boundary metrics)."""
    arr = np.asarray(values, dtype=np.float64)
    defined = arr[np.isfinite(arr)]
    stats = dict(mean=float(defined.mean()) if defined.size else math.nan,
                 std=float(defined.std()) if defined.size else math.nan,
                 median=float(np.median(defined)) if defined.size else math.nan,
                 n=int(arr.size), n_undefined=int(arr.size - defined.size))
    if penalty is not None:
        stats["mean_penalized"] = float(np.where(np.isfinite(arr), arr, penalty).mean()) if arr.size else math.nan
    return stats


def dice_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Foreground Dice of argmax predictions, mean over the cases and then the classes, for validation.
    A class that no mask of `target` holds is left out (predicted nowhere it would score 1 and lift
    the mean), unless no class is held at all."""
    pred, classes = logits.argmax(1), range(1, logits.shape[1])
    held = [c for c in classes if (target == c).any()] or classes
    return torch.stack([overlap_metrics(pred == c, target == c)["dice"].mean() for c in held]).mean()
