"""Plain-torch reference of the weighted knowledge-distillation loss (SPEC section 4).

Readable first, fast never: the Triton kernels are tested against this, and this is tested
against independent oracles (a numpy window loop, `F.kl_div`). Half-precision inputs are
computed in float32; float32 and float64 stay as they are.

Weight modes are a registry: `WEIGHT_MODES` maps a name to a function
`(student_logits, teacher_logits, *, window, gamma, map_temperature) -> (N, H, W) weight`, which receives
detached logits in the compute dtype and ignores the options it does not use. Adding a mode
is one decorated function here (and its test); a mode without a Triton kernel still runs on
every device, its weight map coming from this function.
"""
import torch
import torch.nn.functional as F

SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2
# The Triton ssim kernel keeps the last `window` rows of window sums in registers, so the
# window is bounded; the bound holds on every backend so that a run never depends on the device.
SSIM_MAX_WINDOW = 15
Z_EPS = 1e-6  # keeps the weighted mean finite when every weight is zero
REDUCTIONS = ("weighted_mean", "mean", "sum")
WEIGHT_MODES = {}


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
