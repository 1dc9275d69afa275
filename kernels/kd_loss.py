"""The weighted knowledge-distillation loss (SPEC sections 4 and 8): its API, the readable math
of every weight mode, the reference loss, and the autograd Function of the Triton path.

`weighted_kd_loss` and `kd_weight_map` check their arguments, then run either the Triton
kernels (`kd_triton.py`, compiled on CUDA or interpreted on CPU, imported on the first call that
takes them) or the torch reference below, as `dispatch.resolve_backend` decides. Both paths
return the loss in float32 (float64 for float64 inputs on the torch path) and give the student
logits a gradient in their own dtype and memory format; the teacher never gets one.

The reference is readable first, fast never: the Triton kernels are tested against it, and it
is tested against independent oracles (a numpy window loop, `F.kl_div`). Half-precision inputs
are computed in float32; float32 and float64 stay as they are.

Weight modes are a registry: `WEIGHT_MODES` maps a name to a function
`(student_logits, teacher_logits, *, window, gamma, map_temperature) -> (N, H, W) weight`, which receives
detached logits in the compute dtype and ignores the options it does not use. Adding a mode
is one decorated function here (and its test); a mode without a Triton kernel still runs on
every device, its weight map coming from this function.

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
import torch.nn.functional as F

from .dispatch import resolve_backend

SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2
# The Triton ssim kernel keeps the last `window` rows of window sums in registers, so the
# window is bounded; the bound holds on every backend so that a run never depends on the device.
SSIM_MAX_WINDOW = 15
Z_EPS = 1e-6  # keeps the weighted mean finite when every weight is zero
REDUCTIONS = ("weighted_mean", "mean", "sum")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WEIGHT_MODES = {}
_warned_modes = set()


def weight_mode(name: str):
    """Register the decorated function as the weight mode `name`."""
    def register(fn):
        WEIGHT_MODES[name] = fn
        return fn
    return register


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed and returned in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def foreground_prob(probs: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) class probabilities -> (N, 1, H, W) probability of "not background".

    The sum of classes 1..C-1 rather than 1 - p0: for C = 2 it is p1 bit for bit.
    """
    return probs[:, 1:].sum(dim=1, keepdim=True)


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int) -> torch.Tensor:
    """Local SSIM of two (N, 1, H, W) maps in a window x window box, clipped at the border."""
    def box(x):
        return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)

    mu_a, mu_b = box(a), box(b)
    var_a = box(a * a) - mu_a * mu_a
    var_b = box(b * b) - mu_b * mu_b
    cov = box(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return num / den


@weight_mode("none")
def uniform_weight(zs, zt, **_options):
    """Plain KD: every pixel counts once."""
    n, _, h, w = zs.shape
    return torch.ones((n, h, w), dtype=zs.dtype, device=zs.device)


@weight_mode("agree")
def agreement_weight(zs, zt, **_options):
    """1 - total-variation distance of the class distributions at t = 1."""
    return 1 - 0.5 * (zt.softmax(dim=1) - zs.softmax(dim=1)).abs().sum(dim=1)


@weight_mode("ssim")
def structural_weight(zs, zt, *, window=7, gamma=1.0, map_temperature=1.0, **_options):
    """clamp(SSIM(qT, qS), 0, 1) ** gamma of the foreground maps in a window x window box; the maps
    are the softmax at `map_temperature` (1 in SPEC section 4; above 1 they are softer)."""
    qt = foreground_prob((zt / map_temperature).softmax(dim=1))
    qs = foreground_prob((zs / map_temperature).softmax(dim=1))
    return ssim_map(qt, qs, window).clamp(0, 1).pow(gamma).squeeze(1)


def weight_map_reference(student_logits, teacher_logits, mode, window=7, gamma=1.0, map_temperature=1.0):
    """Per-pixel KD weight (N, H, W) of the registered `mode`; a constant (no gradient)."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode {mode!r}: choose one of {', '.join(WEIGHT_MODES)}")
    dtype = compute_dtype(student_logits.dtype)
    zs = student_logits.detach().to(dtype)
    zt = teacher_logits.detach().to(dtype)
    return WEIGHT_MODES[mode](zs, zt, window=window, gamma=gamma, map_temperature=map_temperature).to(dtype)


def kd_loss_reference(student_logits, teacher_logits, weight, temperature=1.0,
                      reduction="weighted_mean"):
    """t^2 * sum_i w_i KL(pT_i || pS_i) / Z by ordinary autograd; teacher and weight get no gradient."""
    dtype = compute_dtype(student_logits.dtype)
    zs = student_logits.to(dtype)
    zt = teacher_logits.detach().to(dtype)
    w = weight.detach().to(dtype)
    log_ps = F.log_softmax(zs / temperature, dim=1)
    log_pt = F.log_softmax(zt / temperature, dim=1)
    # Written out rather than via F.kl_div, whose zero-target convention would turn a -inf
    # teacher logit (0 * -inf) into a finite number instead of a NaN.
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    total = (w * kl).sum()
    if reduction == "weighted_mean":
        z = w.sum().clamp_min(Z_EPS)
    elif reduction == "mean":
        z = kl.numel()
    elif reduction == "sum":
        z = 1
    else:
        raise ValueError(f"reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    return temperature * temperature * total / z


def _triton():
    """The Triton path's host code, imported by the first call that runs it: Triton is optional."""
    from . import kd_triton
    return kd_triton


class _WeightedKDLoss(torch.autograd.Function):
    """Forward: loss and Z (and the ssim map) in one pass. Backward: the gradient in one more pass."""

    @staticmethod
    def forward(ctx, student, teacher, weight, temperature, reduction, window, gamma, map_temperature):
        loss, z, kept = _triton().loss_and_z(student, teacher, weight, temperature, reduction, window, gamma,
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
        grad = _triton().gradient(student, teacher, ctx.mode or tensor_weight, scale, ctx.temperature)
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
    kd_triton = _triton()
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
    elif weight not in _triton().TRITON_WEIGHT_MODES:
        weight = _reference_weight(student_logits, teacher_logits, weight, *options)
    return _WeightedKDLoss.apply(student_logits, teacher_logits.detach(), weight, temperature, reduction, *options)
