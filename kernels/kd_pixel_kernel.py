"""Triton kernel of the KD loss for weights known pixel by pixel: none, agree, a weight tensor.

A program owns a ROWS x COLS tile of one image and touches each logit once: it loads a
(C_P, ROWS*COLS) tile per input, and, as PHASE asks, writes the per-program partial sums of
w*KL and w (LOSS), the student gradient w*scale*(pS - pT) (GRAD), or the weight (WEIGHT_MAP).
The grid is one-dimensional, image after image, so the batch size has no grid-axis limit.
"""
import triton
import triton.language as tl

from .kd_tiles import (GRAD, LOG2E, LOSS, WEIGHT_MAP, load_classes_last, load_logits, log2_scale, logit_gap,
                       probabilities, sigmoid_parts, store_classes_last, store_tile, student_grad, weighted_kl)

# the WEIGHT constexpr: a weight of 1, the agreement computed in the kernel, or a weight tensor read
WEIGHT_CODES = {"none": 0, "agree": 1, "tensor": 2}
UNIFORM = tl.constexpr(WEIGHT_CODES["none"])
AGREE = tl.constexpr(WEIGHT_CODES["agree"])


@triton.jit
def agreement(zs, zt, C_P: tl.constexpr):
    """1 - total-variation distance of the class distributions at t = 1."""
    if C_P == 2:  # the two classes differ by the same amount, in opposite directions
        ps1, _, _ = sigmoid_parts(logit_gap(zs) * LOG2E)
        pt1, _, _ = sigmoid_parts(logit_gap(zt) * LOG2E)
        return 1.0 - tl.abs(pt1 - ps1)
    return 1.0 - 0.5 * tl.sum(tl.abs(probabilities(zt, LOG2E, C_P) - probabilities(zs, LOG2E, C_P)), axis=0)


@triton.jit
def kd_pixel_kernel(s_ptr, t_ptr, w_ptr, out_ptr, part_ptr, scale_ptr,
                    C, H, W, inv_t, tiles_h, tiles_w,
                    s_n, s_c, s_h, s_w, t_n, t_c, t_h, t_w, w_n, w_h, w_w, o_n, o_c, o_h, o_w,
                    C_P: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                    WEIGHT: tl.constexpr, PHASE: tl.constexpr, T_IS_ONE: tl.constexpr,
                    CLASSES_LAST: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // (tiles_h * tiles_w)).to(tl.int64)  # image offsets may pass 2**31
    tile = pid % (tiles_h * tiles_w)
    lane = tl.arange(0, ROWS * COLS)
    y0 = tile // tiles_w * ROWS
    x0 = tile % tiles_w * COLS
    y = y0 + lane // COLS
    x = x0 + lane % COLS
    inside = (y < H) & (x < W)
    if CLASSES_LAST:
        # Channels-last with C = C_P: a tile row is one run of adjacent elements, loaded as
        # such in 16-byte accesses (`classes_last_rows`); the gradient has the student's layout
        zs = load_classes_last(s_ptr + n * s_n, y0, x0, s_h, H, W, ROWS, COLS, C_P)
        zt = load_classes_last(t_ptr + n * t_n, y0, x0, t_h, H, W, ROWS, COLS, C_P)
    else:
        zs = load_logits(s_ptr + n * s_n, y * s_h + x * s_w, s_c, C, inside, C_P)
        zt = load_logits(t_ptr + n * t_n, y * t_h + x * t_w, t_c, C, inside, C_P)
    k = log2_scale(inv_t, T_IS_ONE)

    if WEIGHT == UNIFORM:
        w = tl.full([ROWS * COLS], 1.0, tl.float32)
    elif WEIGHT == AGREE:
        w = agreement(zs, zt, C_P)
    else:
        w = tl.load(w_ptr + n * w_n + y * w_h + x * w_w, mask=inside, other=0.0).to(tl.float32)
    w = tl.where(inside, w, 0.0)

    if PHASE == LOSS:
        tl.store(part_ptr + pid, tl.sum(weighted_kl(zs, zt, w, k, C, C_P), axis=0))
        if WEIGHT == UNIFORM:
            # w is 1 on the tile's pixels inside the image: their count, with no block-wide
            # sum (shuffles, shared memory and barriers: 20-50 instructions a program)
            total_w = (tl.minimum(H - y0, ROWS) * tl.minimum(W - x0, COLS)).to(tl.float32)
        else:
            total_w = tl.sum(w, axis=0)
        tl.store(part_ptr + tl.num_programs(0) + pid, total_w)
    elif PHASE == GRAD:
        g = student_grad(zs, zt, w * tl.load(scale_ptr), k, C_P)
        if CLASSES_LAST:
            store_classes_last(out_ptr + n * o_n, g, y0, x0, o_h, H, W, ROWS, COLS, C_P)
        else:
            store_tile(out_ptr + n * o_n, y * o_h + x * o_w, o_c, g, C, inside, C_P)
    else:
        tl.static_assert(PHASE == WEIGHT_MAP)
        tl.store(out_ptr + n * o_n + y * o_h + x * o_w, w, mask=inside)
