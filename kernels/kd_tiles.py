"""Per-pixel pieces shared by the two KD kernels (`kd_pixel_kernel.py`, `kd_ssim_kernel.py`).

A tile is (C_P, LANES): classes padded to a power of two along axis 0, pixels along axis 1.
Addresses are `image base + class * class stride + pixel offset`, so any strides work: for
NCHW-contiguous logits the pixel offsets of a row are contiguous, for channels-last the classes
of a pixel are, and Triton's specialisation of unit strides lets the compiler vectorise either.
"""
import triton
import triton.language as tl

# What a launch computes: loss partial sums, the student gradient, or the weight map.
LOSS = tl.constexpr(0)
GRAD = tl.constexpr(1)
WEIGHT_MAP = tl.constexpr(2)


@triton.jit
def load_logits(image_ptr, pix_offset, class_stride, C, mask, C_P: tl.constexpr):
    """(C_P, LANES) float32 logits; padded classes are -inf, masked pixels 0 (a finite softmax)."""
    cls = tl.arange(0, C_P)[:, None]
    z = tl.load(image_ptr + cls * class_stride + pix_offset[None, :],
                mask=(cls < C) & mask[None, :], other=0.0)
    return tl.where(cls < C, z.to(tl.float32), float("-inf"))


@triton.jit
def softmax(z):
    """Softmax and log-softmax over axis 0 of a (C_P, LANES) tile."""
    shifted = z - tl.max(z, axis=0)[None, :]
    e = tl.exp(shifted)
    total = tl.sum(e, axis=0)
    return e * (1.0 / total)[None, :], shifted - tl.log(total)[None, :]


@triton.jit
def foreground(z, C, C_P: tl.constexpr):
    """Probability of "not background" at t = 1: the sum of classes 1..C-1 (exactly p1 for C = 2)."""
    p, _ = softmax(z)
    cls = tl.arange(0, C_P)[:, None]
    return tl.sum(tl.where((cls >= 1) & (cls < C), p, 0.0), axis=0)


@triton.jit
def tempered(z, inv_t, T_IS_ONE: tl.constexpr):
    # at t = 1 the tile is the very one the t = 1 weight used, so the compiler shares its softmax
    if T_IS_ONE:
        return z
    return z * inv_t


@triton.jit
def weighted_kl(zs, zt, w, inv_t, C, C_P: tl.constexpr, T_IS_ONE: tl.constexpr):
    """w * KL(pT || pS) per pixel at temperature t."""
    _, log_ps = softmax(tempered(zs, inv_t, T_IS_ONE))
    pt, log_pt = softmax(tempered(zt, inv_t, T_IS_ONE))
    cls = tl.arange(0, C_P)[:, None]
    # Padded classes give 0 * (-inf + inf); real classes keep their NaN/Inf.
    return w * tl.sum(tl.where(cls < C, pt * (log_pt - log_ps), 0.0), axis=0)


@triton.jit
def store_grad(grad_image_ptr, pix_offset, class_stride, zs, zt, w_scale, inv_t, mask, C,
               C_P: tl.constexpr, T_IS_ONE: tl.constexpr):
    """Store w * scale * (pS - pT), computed in float32 and rounded once to the gradient's dtype."""
    ps, _ = softmax(tempered(zs, inv_t, T_IS_ONE))
    pt, _ = softmax(tempered(zt, inv_t, T_IS_ONE))
    cls = tl.arange(0, C_P)[:, None]
    g = (ps - pt) * w_scale[None, :]
    tl.store(grad_image_ptr + cls * class_stride + pix_offset[None, :],
             g.to(grad_image_ptr.dtype.element_ty), mask=(cls < C) & mask[None, :])
