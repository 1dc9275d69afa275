"""Plain-torch reference of the weighted knowledge-distillation loss (SPEC section 4).

Readable first, fast never: the Triton kernels in `kd_triton.py` are tested against this, and
this is tested against independent oracles (a numpy window loop, `F.kl_div`).
Half-precision inputs are computed in float32; float32 and float64 stay as they are.
"""
import torch
import torch.nn.functional as F

SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2
Z_EPS = 1e-6  # keeps the weighted mean finite when every weight is zero
REDUCTIONS = ("weighted_mean", "mean", "sum")
WEIGHT_MODES = ("none", "agree", "ssim")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed and returned in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def foreground_prob(probs: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) class probabilities -> (N, 1, H, W) mean probability of the classes 1..C-1."""
    return probs[:, 1:].mean(dim=1, keepdim=True)


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


def weight_map_reference(student_logits, teacher_logits, mode, window=7, gamma=1.0):
    """Per-pixel KD weight (N, H, W) in [0, 1]; a constant (computed without gradient)."""
    dtype = compute_dtype(student_logits.dtype)
    zs = student_logits.detach().to(dtype)
    zt = teacher_logits.detach().to(dtype)
    n, _, h, w = zs.shape
    if mode == "none":
        return torch.ones((n, h, w), dtype=dtype, device=zs.device)
    ps, pt = zs.softmax(dim=1), zt.softmax(dim=1)  # always at t = 1
    if mode == "agree":
        return 1 - 0.5 * (pt - ps).abs().sum(dim=1)
    if mode == "ssim":
        ssim = ssim_map(foreground_prob(pt), foreground_prob(ps), window)
        return ssim.clamp(0, 1).pow(gamma).squeeze(1)
    raise ValueError(f"weight mode {mode!r}: choose one of {', '.join(WEIGHT_MODES)}")


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
