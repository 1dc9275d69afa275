"""Public API of the weighted knowledge-distillation loss (SPEC sections 4 and 8).

`weighted_kd_loss` and `kd_weight_map` check their arguments, then run either the Triton
kernels (`kd_triton.py`, compiled on CUDA or interpreted on CPU) or the torch reference
(`kd_reference.py`), as `backend.resolve_backend` decides. Both paths return the loss in
float32 (float64 for float64 inputs on the torch path) and give the student logits a gradient
in their own dtype and memory format; the teacher never gets one.

Why the Triton backward reads the logits again instead of saving a gradient in forward: the
gradient t*w*(pS - pT)*grad_output/Z must be rounded to the input dtype once, after every factor
is known. Folded into a float16 gradient in forward, 1/Z underflows at realistic sizes before a
loss scale can rescue it, and grad_output is only known in backward. Recomputing costs the same
traffic as saving and rescaling (5 units of logit-sized tensors per step, `bench/kd_traffic.py`);
the ssim weight is not recomputed but kept from the forward as a float32 map. Neither pass reads a
device value on the host, so nothing synchronises.
"""
import warnings

import torch

from . import kd_triton
from .backend import resolve_backend
from .kd_reference import (REDUCTIONS, SSIM_MAX_WINDOW, WEIGHT_MODES, kd_loss_reference,
                           weight_map_reference)

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned_modes = set()


class _WeightedKDLoss(torch.autograd.Function):
    """Forward: loss and Z (and the ssim map) in one pass. Backward: the gradient in one more pass."""

    @staticmethod
    def forward(ctx, student, teacher, weight, temperature, reduction, window, gamma, map_temperature):
        loss, z, kept = kd_triton.loss_and_z(student, teacher, weight, temperature, reduction, window, gamma,
                                             map_temperature, keep_weight=ctx.needs_input_grad[0])
        tensor_weight = weight if isinstance(weight, torch.Tensor) else kept
        z_tensor = z if isinstance(z, torch.Tensor) else None
        ctx.save_for_backward(student, teacher, tensor_weight, z_tensor)
        ctx.mode = weight if tensor_weight is None else None  # "none" or "agree": computed again
        ctx.temperature = temperature
        ctx.z = z if z_tensor is None else None
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, tensor_weight, z_tensor = ctx.saved_tensors
        z = z_tensor if z_tensor is not None else ctx.z
        scale = (grad_output.float() * ctx.temperature / z).reshape(())  # stays on the device
        grad = kd_triton.gradient(student, teacher, ctx.mode or tensor_weight, scale, ctx.temperature)
        return grad, None, None, None, None, None, None, None


def _check_logits(student_logits, teacher_logits):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if student_logits.dim() != 4:
        raise ValueError(f"student_logits must be (N, C, H, W), got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} differs from "
                         f"student_logits shape {tuple(student_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits on {teacher_logits.device}, student_logits on "
                         f"{student_logits.device}: put both on one device")
    n, c, h, w = student_logits.shape
    if not 2 <= c <= 8:
        raise ValueError(f"the class dimension C = {c} must be between 2 and 8")
    if min(n, h, w) < 1:
        raise ValueError(f"logits of shape {tuple(student_logits.shape)} are empty")


def _check_weight_options(mode, window, gamma, map_temperature):
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode {mode!r}: choose one of {', '.join(WEIGHT_MODES)} "
                         "or pass an (N, H, W) tensor")
    if (isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= SSIM_MAX_WINDOW
            or window % 2 == 0):
        raise ValueError(f"window={window!r} must be an odd integer from 1 to {SSIM_MAX_WINDOW}")
    if not gamma > 0:
        raise ValueError(f"gamma={gamma!r} must be positive")
    if not (isinstance(map_temperature, (int, float)) and 0 < map_temperature < float("inf")):
        raise ValueError(f"map_temperature={map_temperature!r} must be a positive finite number")


def _resolve(backend, student_logits, teacher_logits):
    """The backend to run, after checking that the Triton kernels take these dtypes."""
    backend = resolve_backend(backend, student_logits)
    if backend != "torch":
        for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if x.dtype not in TRITON_DTYPES:
                raise ValueError(f"{name} dtype {x.dtype}: the Triton kernels take float32, bfloat16 "
                                 "or float16 (use backend='torch' for other dtypes)")
    return backend


def _reference_weight(student_logits, teacher_logits, mode, window, gamma, map_temperature):
    """The weight map of a mode without a Triton kernel, from its reference, on any device."""
    if mode not in _warned_modes:
        _warned_modes.add(mode)
        warnings.warn(f"weight mode {mode!r} has no Triton kernel: its weight map comes from the "
                      "torch reference, then the fused loss kernel uses it", stacklevel=3)
    return weight_map_reference(student_logits, teacher_logits, mode, window, gamma, map_temperature).float()


def kd_weight_map(student_logits, teacher_logits, mode="ssim", window=7, gamma=1.0, map_temperature=1.0,
                  backend=None):
    """Per-pixel KD weight (N, H, W) in [0, 1] of a registered `mode`; no gradient."""
    _check_logits(student_logits, teacher_logits)
    options = (window, gamma, map_temperature)
    _check_weight_options(mode, *options)
    if _resolve(backend, student_logits, teacher_logits) == "torch":
        return weight_map_reference(student_logits, teacher_logits, mode, *options)
    if mode not in kd_triton.TRITON_WEIGHT_MODES:
        return _reference_weight(student_logits, teacher_logits, mode, *options)
    return kd_triton.weight_map(student_logits.detach(), teacher_logits.detach(), mode, *options)


def weighted_kd_loss(student_logits, teacher_logits, weight="ssim", temperature=1.0,
                     reduction="weighted_mean", window=7, gamma=1.0, map_temperature=1.0, backend=None):
    """t^2 * sum_i w_i KL(softmax(zT_i / t) || softmax(zS_i / t)) / Z (SPEC section 4).

    weight: a registered mode (`kernels.WEIGHT_MODES`: "none" | "agree" | "ssim" ...) or a
    caller's (N, H, W) tensor, used as a constant.
    reduction: "weighted_mean" (Z = sum w, at least 1e-6), "mean" (Z = N*H*W) or "sum" (Z = 1).
    window, gamma, map_temperature: the ssim weight's box size (odd, 1 to 15), its exponent, and
    the temperature of the foreground maps it compares (1: SPEC section 4). Only the student
    gets a gradient, in its own dtype and memory format. Logits of any strides are read in place.
    """
    _check_logits(student_logits, teacher_logits)
    if isinstance(weight, torch.Tensor):
        n, _, h, w = student_logits.shape
        if weight.shape != (n, h, w):
            raise ValueError(f"weight tensor shape {tuple(weight.shape)} must be (N, H, W) = {(n, h, w)}")
        if not weight.is_floating_point() or weight.device != student_logits.device:
            raise ValueError(f"weight tensor must be floating point on {student_logits.device}, "
                             f"got {weight.dtype} on {weight.device}")
    options = (window, gamma, map_temperature)
    _check_weight_options("none" if isinstance(weight, torch.Tensor) else weight, *options)
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature={temperature!r} must be a positive finite number")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    temperature = float(temperature)

    if _resolve(backend, student_logits, teacher_logits) == "torch":
        if not isinstance(weight, torch.Tensor):
            weight = weight_map_reference(student_logits, teacher_logits, weight, *options)
        return kd_loss_reference(student_logits, teacher_logits, weight, temperature, reduction)
    if isinstance(weight, torch.Tensor):
        weight = weight.detach()
    elif weight not in kd_triton.TRITON_WEIGHT_MODES:
        weight = _reference_weight(student_logits, teacher_logits, weight, *options)
    return _WeightedKDLoss.apply(student_logits, teacher_logits.detach(), weight, temperature, reduction, *options)
