"""Per-pixel pieces shared by the two KD kernels (`kd_pixel_kernel.py`, `kd_ssim_kernel.py`).

A tile is (C_P, LANES): classes padded to a power of two along axis 0, pixels along axis 1.
Addresses are `image base + class * class stride + pixel offset`, so any strides work: for
NCHW-contiguous logits the pixel offsets of a row are contiguous, for channels-last the classes
of a pixel are, and Triton's specialisation of unit strides lets the compiler vectorise either
(for channels-last C_P elements at a time only; the pixel kernel loads channels-last rows
without padded classes as whole runs, `classes_last_rows`).

The loss pass is bound by instructions, not bytes, so the arithmetic is written for few of them:
- exponentials are `exp2` of logits scaled by k = log2(e)/t, one multiply folded into the shift
  by the maximum (the hardware's exp is an exp2 behind a multiply anyway);
- KL takes one logarithm a pixel instead of two: with shifted logits s = u - max u (u = z k)
  and sums S = sum 2^s,  KL / ln 2 = sum_c pT (sT - sS) + log2(SS / ST),  the ratio by the one
  reciprocal 1 / ST that the probabilities pT need too, the logarithm the hardware's;
- C = 2 (C_P = 2 only for C = 2) is a sigmoid of the logit gap d = u1 - u0: with a = 2^-|d|,
  p1 = (d >= 0 ? 1 : a) / (1 + a), so one exp2 and one reciprocal a tensor and no maximum;
  KL / ln 2 = pT1 (dT - dS) + max(dS, 0) - max(dT, 0) + log2((1 + aS) / (1 + aT)); the gradient
  of class 0 is minus that of class 1; no class is padded, so the class mask folds away.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .backend import INTERPRET

# What a launch computes: loss partial sums, the student gradient, or the weight map.
LOSS = tl.constexpr(0)
GRAD = tl.constexpr(1)
WEIGHT_MAP = tl.constexpr(2)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The interpreter runs no libdevice call: it takes the exact log2 of the same argument.
HARDWARE_LOG2 = tl.constexpr(not INTERPRET)


@triton.jit
def fast_log2(x):
    """log2 of a positive x. Compiled: the hardware approximation (MUFU.LG2, within 2^-22 of
    log2 on [1/2, 2], relative 2^-22 beyond), one instruction where `tl.log2` takes ~15, which
    would be a fifth of the loss pass."""
    if HARDWARE_LOG2:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def real_classes(C, C_P: tl.constexpr):
    """(C_P, 1) mask of the classes that exist; all of them, known to the compiler, at C_P = 2."""
    cls = tl.arange(0, C_P)[:, None]
    if C_P == 2:
        return cls < 2
    return cls < C


@triton.jit
def load_logits(image_ptr, pix_offset, class_stride, C, mask, C_P: tl.constexpr):
    """(C_P, LANES) float32 logits; padded classes are -inf, masked pixels 0 (a finite softmax)."""
    cls = tl.arange(0, C_P)[:, None]
    real = real_classes(C, C_P)
    z = tl.load(image_ptr + cls * class_stride + pix_offset[None, :], mask=real & mask[None, :], other=0.0)
    return tl.where(real, z.to(tl.float32), float("-inf"))


@triton.jit
def classes_last_rows(y0, x0, row_stride, H, W, ROWS: tl.constexpr, COLS: tl.constexpr, C_P: tl.constexpr):
    """Offsets and mask of a (ROWS, COLS*C_P) block of channels-last memory with no padded class:
    a tile row is one run of COLS*C_P adjacent elements, the classes of pixel after pixel.
    Addressed as runs, the compiler vectorises along them (pixel offsets x*C_P show it runs of
    C_P only): a few 16-byte accesses a thread, one address each."""
    rows = y0 + tl.arange(0, ROWS)
    run = x0 * C_P + tl.arange(0, COLS * C_P)
    return rows[:, None] * row_stride + run[None, :], (rows < H)[:, None] & (run < W * C_P)[None, :]


@triton.jit
def load_classes_last(image_ptr, y0, x0, row_stride, H, W, ROWS: tl.constexpr, COLS: tl.constexpr,
                      C_P: tl.constexpr):
    """`load_logits` for channels-last memory with no padded class (`classes_last_rows`)."""
    offsets, mask = classes_last_rows(y0, x0, row_stride, H, W, ROWS, COLS, C_P)
    z = tl.load(image_ptr + offsets, mask=mask, other=0.0)
    return tl.trans(tl.reshape(z.to(tl.float32), (ROWS * COLS, C_P)))


@triton.jit
def store_classes_last(image_ptr, values, y0, x0, row_stride, H, W, ROWS: tl.constexpr, COLS: tl.constexpr,
                       C_P: tl.constexpr):
    """Store a (C_P, ROWS*COLS) tile to channels-last memory with no padded class, rounded once
    to its dtype (`classes_last_rows`)."""
    offsets, mask = classes_last_rows(y0, x0, row_stride, H, W, ROWS, COLS, C_P)
    runs = tl.reshape(tl.trans(values), (ROWS, COLS * C_P))
    tl.store(image_ptr + offsets, runs.to(image_ptr.dtype.element_ty), mask=mask)


@triton.jit
def log2_scale(inv_t, T_IS_ONE: tl.constexpr):
    """k = log2(e) / t. At t = 1 a constant, so that a t = 1 weight and the loss share one tile."""
    if T_IS_ONE:
        return LOG2E
    return LOG2E * inv_t


@triton.jit
def logit_gap(z):
    """z1 - z0 of a (2, LANES) tile (in one thread's registers: no shuffle)."""
    cls = tl.arange(0, 2)[:, None]
    return tl.sum(tl.where(cls == 1, z, -z), axis=0)


@triton.jit
def sigmoid_parts(d):
    """(p1, a, 1 / (1 + a)) of a logit gap d in log2 units, a = 2^-|d|."""
    a = tl.exp2(-tl.abs(d))
    r = 1.0 / (1.0 + a)
    return tl.where(d >= 0.0, 1.0, a) * r, a, r


@triton.jit
def softmax2(u):
    """(p, shifted u, 1 / sum) over axis 0 of a (C_P, LANES) tile of logits in log2 units."""
    shifted = u - tl.max(u, axis=0)[None, :]
    e = tl.exp2(shifted)
    inv_total = 1.0 / tl.sum(e, axis=0)
    return e * inv_total[None, :], shifted, inv_total


@triton.jit
def probabilities(z, k, C_P: tl.constexpr):
    """Softmax over axis 0 of z * k / log2(e) (the class probabilities at t = log2(e) / k)."""
    if C_P == 2:
        p1, _, _ = sigmoid_parts(logit_gap(z) * k)
        cls = tl.arange(0, 2)[:, None]
        return tl.where(cls == 1, p1[None, :], 1.0 - p1[None, :])
    p, _, _ = softmax2(z * k)
    return p


@triton.jit
def foreground(z, k, C, C_P: tl.constexpr):
    """Probability of "not background" at t = log2(e) / k: the sum of classes 1..C-1 (exactly p1
    for C = 2)."""
    if C_P == 2:
        p1, _, _ = sigmoid_parts(logit_gap(z) * k)
        return p1
    p = probabilities(z, k, C_P)
    cls = tl.arange(0, C_P)[:, None]
    return tl.sum(tl.where((cls >= 1) & real_classes(C, C_P), p, 0.0), axis=0)


@triton.jit
def weighted_kl(zs, zt, w, k, C, C_P: tl.constexpr):
    """w * KL(pT || pS) per pixel at temperature t = log2(e) / k, with one logarithm."""
    if C_P == 2:
        d_t = logit_gap(zt) * k
        d_s = logit_gap(zs) * k
        pt1, _, r_t = sigmoid_parts(d_t)
        a_s = tl.exp2(-tl.abs(d_s))
        kl2 = (pt1 * (d_t - d_s) + tl.maximum(d_s, 0.0) - tl.maximum(d_t, 0.0)
               + fast_log2((1.0 + a_s) * r_t))
        return w * (LN2 * kl2)
    pt, shifted_t, inv_total_t = softmax2(zt * k)
    shifted_s = zs * k - tl.max(zs * k, axis=0)[None, :]
    total_s = tl.sum(tl.exp2(shifted_s), axis=0)
    # Padded classes give 0 * (-inf + inf); real classes keep their NaN/Inf.
    cross = tl.sum(tl.where(real_classes(C, C_P), pt * (shifted_t - shifted_s), 0.0), axis=0)
    return w * (LN2 * (cross + fast_log2(total_s * inv_total_t)))


@triton.jit
def student_grad(zs, zt, w_scale, k, C_P: tl.constexpr):
    """(C_P, LANES) float32 w * scale * (pS - pT); padded classes are 0."""
    if C_P == 2:
        ps1, _, _ = sigmoid_parts(logit_gap(zs) * k)
        pt1, _, _ = sigmoid_parts(logit_gap(zt) * k)
        g1 = (ps1 - pt1) * w_scale
        cls = tl.arange(0, 2)[:, None]
        return tl.where(cls == 1, g1[None, :], -g1[None, :])
    return (probabilities(zs, k, C_P) - probabilities(zt, k, C_P)) * w_scale[None, :]


@triton.jit
def store_tile(image_ptr, pix_offset, class_stride, values, C, mask, C_P: tl.constexpr):
    """Store the real classes of a (C_P, LANES) tile, rounded once to the image's dtype."""
    cls = tl.arange(0, C_P)[:, None]
    tl.store(image_ptr + cls * class_stride + pix_offset[None, :],
             values.to(image_ptr.dtype.element_ty), mask=real_classes(C, C_P) & mask[None, :])
