"""Public entry point for the boundary metrics HD, HD95 and ASSD (SPEC sections 7 and 8).

Checks the arguments and sends the batch to the Triton path (`boundary_triton.py`: CUDA, or the
interpreter) or the CPU reference (`boundary_reference.py`, whose docstring has the definitions).
"""
import math
import numbers

import torch

from .backend import resolve_backend
from .boundary_reference import boundary_metrics_reference

MODES = ("max", "pooled")


def _check_arguments(pred, target, spacing, percentile, mode):
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
    if mode not in MODES:
        raise ValueError(f"boundary_metrics: mode must be one of {', '.join(MODES)}, got {mode!r}")


def boundary_metrics(pred: torch.Tensor, target: torch.Tensor, spacing=(1.0, 1.0), percentile: float = 95.0,
                     mode: str = "max", backend: str | None = None) -> dict:
    """Exact Hausdorff distance, percentile Hausdorff distance and average symmetric surface distance.

    pred, target: bool or integer masks (nonzero = foreground) of shape (B, H, W) or (H, W).
    spacing: pixel size (sy, sx). mode: "max" takes the larger of the two directed percentiles
    (MONAI, DeepMind surface-distance), "pooled" the percentile of both directions together (MedPy).
    backend: None picks by device (see `kernels.backend`); "torch" forces the CPU reference,
    "triton"/"interpret" the Triton path.
    Returns {"hd", "hd95", "assd"}: float64 CPU tensors of shape (B,), or 0-d for (H, W) input;
    0 where both masks are empty, NaN where exactly one is.
    """
    _check_arguments(pred, target, spacing, percentile, mode)
    single = pred.ndim == 2
    pred, target = (pred[None], target[None]) if single else (pred, target)
    pred, target = (m if m.dtype == torch.bool else m != 0 for m in (pred, target))
    spacing = (float(spacing[0]), float(spacing[1]))
    if resolve_backend(backend, pred) == "torch":
        result = boundary_metrics_reference(pred.cpu(), target.cpu(), spacing, float(percentile), mode)
    else:
        from .boundary_triton import boundary_metrics_triton  # triton is optional on CPU machines
        result = boundary_metrics_triton(pred, target, spacing, float(percentile), mode)
    return {name: value[0] if single else value for name, value in result.items()}
