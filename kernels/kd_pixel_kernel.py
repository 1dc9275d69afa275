"""Triton kernel of the KD loss for weights known pixel by pixel: none, agree, a weight tensor.

A program owns a ROWS x COLS tile of one image and touches each logit once: it loads a
(C_P, ROWS*COLS) tile per input, and, as PHASE asks, writes the per-program partial sums of
w*KL and w (LOSS), the student gradient w*scale*(pS - pT) (GRAD), or the weight (WEIGHT_MAP).
The grid is one-dimensional, image after image, so the batch size has no grid-axis limit.
"""
import triton
import triton.language as tl

from .kd_tiles import GRAD, LOSS, WEIGHT_MAP, load_logits, softmax, store_grad, weighted_kl

UNIFORM = tl.constexpr(0)
AGREE = tl.constexpr(1)
TENSOR = tl.constexpr(2)
WEIGHT_CODES = {"none": 0, "agree": 1, "tensor": 2}


@triton.jit
def agreement(zs, zt):
    """1 - total-variation distance of the class distributions at t = 1."""
    ps, _ = softmax(zs)
    pt, _ = softmax(zt)
    return 1.0 - 0.5 * tl.sum(tl.abs(pt - ps), axis=0)


@triton.jit
def kd_pixel_kernel(s_ptr, t_ptr, w_ptr, out_ptr, part_ptr, scale_ptr,
                    C, H, W, inv_t, tiles_h, tiles_w,
                    s_n, s_c, s_h, s_w, t_n, t_c, t_h, t_w, w_n, w_h, w_w, o_n, o_c, o_h, o_w,
                    C_P: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                    WEIGHT: tl.constexpr, PHASE: tl.constexpr, T_IS_ONE: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // (tiles_h * tiles_w)).to(tl.int64)  # image offsets may pass 2**31
    tile = pid % (tiles_h * tiles_w)
    lane = tl.arange(0, ROWS * COLS)
    y = tile // tiles_w * ROWS + lane // COLS
    x = tile % tiles_w * COLS + lane % COLS
    inside = (y < H) & (x < W)
    zs = load_logits(s_ptr + n * s_n, y * s_h + x * s_w, s_c, C, inside, C_P)
    zt = load_logits(t_ptr + n * t_n, y * t_h + x * t_w, t_c, C, inside, C_P)

    if WEIGHT == UNIFORM:
        w = tl.full([ROWS * COLS], 1.0, tl.float32)
    elif WEIGHT == AGREE:
        w = agreement(zs, zt)
    else:
        w = tl.load(w_ptr + n * w_n + y * w_h + x * w_w, mask=inside, other=0.0).to(tl.float32)
    w = tl.where(inside, w, 0.0)

    if PHASE == LOSS:
        tl.store(part_ptr + pid, tl.sum(weighted_kl(zs, zt, w, inv_t, C, C_P, T_IS_ONE), axis=0))
        tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(w, axis=0))
    elif PHASE == GRAD:
        store_grad(out_ptr + n * o_n, y * o_h + x * o_w, o_c, zs, zt, w * tl.load(scale_ptr), inv_t,
                   inside, C, C_P, T_IS_ONE)
    else:
        tl.static_assert(PHASE == WEIGHT_MAP)
        tl.store(out_ptr + n * o_n + y * o_h + x * o_w, w, mask=inside)
