"""All Triton code of the weighted KD loss: the two kernels, their shared per-pixel pieces, and
the host side that picks a kernel and tile for a call and launches it (`kd_loss.py` has the math
in plain torch, the API and the autograd Function, and imports this module on first use).

Forward and backward are separate passes over the logits (see `kd_loss.py` for why):
- `loss_and_z`: partial sums of w*KL and w per program, summed by torch (deterministic, no
  atomics); returns the loss and Z as device values, never read on the host. With the ssim
  weight and a gradient to come, the same pass stores the weight map for the backward;
- `gradient`: the pixel kernel's GRAD phase, w * scale * (pS - pT) with scale =
  grad_output * t / Z read from device memory, written in the student's memory format;
- `weight_map`: the weight map alone.
`plan` is the single place that decides kernel, tile, grid and meta-parameters; the launches
and `bench.compile_check` (ahead-of-time compile for sm_90/sm_80) both go through it.

Two kernels: `kd_pixel_kernel` for weights known pixel by pixel (none, agree, a weight tensor),
`kd_ssim_kernel` for the structural weight, whose pixels need a window of their neighbours.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .dispatch import Launch, interpreter_requested
from .kd_loss import SSIM_C1, SSIM_C2, Z_EPS

# ---------------------------------------------------------------- per-pixel pieces of both kernels
# A tile is (C_P, LANES): classes padded to a power of two along axis 0, pixels along axis 1.
# Addresses are `image base + class * class stride + pixel offset`, so any strides work: for
# NCHW-contiguous logits the pixel offsets of a row are contiguous, for channels-last the classes
# of a pixel are, and Triton's specialisation of unit strides lets the compiler vectorise either
# (for channels-last C_P elements at a time only; the pixel kernel loads channels-last rows
# without padded classes as whole runs, `classes_last_rows`).
#
# The loss pass is bound by instructions, not bytes, so the arithmetic is written for few of them:
# - exponentials are `exp2` of logits scaled by k = log2(e)/t, one multiply folded into the shift
#   by the maximum (the hardware's exp is an exp2 behind a multiply anyway);
# - KL takes one logarithm a pixel instead of two: with shifted logits s = u - max u (u = z k)
#   and sums S = sum 2^s,  KL / ln 2 = sum_c pT (sT - sS) + log2(SS / ST),  the ratio by the one
#   reciprocal 1 / ST that the probabilities pT need too, the logarithm the hardware's;
# - C = 2 (C_P = 2 only for C = 2) is a sigmoid of the logit gap d = u1 - u0: with a = 2^-|d|,
#   p1 = (d >= 0 ? 1 : a) / (1 + a), so one exp2 and one reciprocal a tensor and no maximum;
#   KL / ln 2 = pT1 (dT - dS) + max(dS, 0) - max(dT, 0) + log2((1 + aS) / (1 + aT)); the gradient
#   of class 0 is minus that of class 1; no class is padded, so the class mask folds away.

# What a launch computes: loss partial sums, the student gradient, or the weight map.
LOSS = tl.constexpr(0)
GRAD = tl.constexpr(1)
WEIGHT_MAP = tl.constexpr(2)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The interpreter runs no libdevice call: it takes the exact log2 of the same argument. Triton
# interprets the kernels decorated below if TRITON_INTERPRET is set now.
HARDWARE_LOG2 = tl.constexpr(not interpreter_requested())


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


# ---------------------------------------------------------------- pixel kernel: none, agree, a weight tensor
# A program owns a ROWS x COLS tile of one image and touches each logit once: it loads a
# (C_P, ROWS*COLS) tile per input, and, as PHASE asks, writes the per-program partial sums of
# w*KL and w (LOSS), the student gradient w*scale*(pS - pT) (GRAD), or the weight (WEIGHT_MAP).
# The grid is one-dimensional, image after image, so the batch size has no grid-axis limit.

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


# ---------------------------------------------------------------- ssim kernel: the structural weight
# The weight of a pixel needs the foreground maps qT, qS of its window x window box (radius R),
# which no single pixel holds. A program owns a strip of LANES columns (LANES - 2R of them its
# own, R of halo on each side) and a chunk of rows of one image, and walks down the rows:
# 1. load input row y once, compute qT, qS at the map temperature (zero outside the image);
# 2. horizontal window sums of qT, qS, qT^2, qS^2, qT*qS by 2R+1 gathers along the row
#    (`tl.gather`, lowered through shared memory, never a global scratch buffer);
# 3. keep the last 2R+1 rows of those sums in a register ring (RING >= 2R+1 rows, padded to a
#    power of two, the padding rows zero): the vertical sum is a sum over the ring's axis;
# 4. once the ring holds rows y-2R..y, the window of output row y-R is complete: its SSIM weight
#    follows; the program stores it (STORE_WEIGHT) and, for the loss (WITH_LOSS), reads that
#    row's logits again (R rows after the first read, from L1/L2, not DRAM) for the partial sums.
#
# The gradient pass does not run this kernel again: the SSIM weight costs hundreds of
# instructions a pixel, far more than the pixel kernel's pass over a stored weight map, so the
# training forward stores the map and the backward reads it (`bench/kd_traffic.py` counts the bytes).
#
# Each logit comes from DRAM once, apart from the 2R halo rows at the ends of a chunk and the
# 2R halo columns of a strip (see `bench/kd_traffic.py`). Sums are direct sums of at most 2R+1 terms,
# as accurate as the window allows in float32; no running sums that drift down the image.

_C1 = tl.constexpr(SSIM_C1)
_C2 = tl.constexpr(SSIM_C2)


@triton.jit
def horizontal_sums(qt, qs, R: tl.constexpr, LANES: tl.constexpr):
    """Sums of qT, qS, qT^2, qS^2, qT*qS over lanes j-R..j+R; only lanes R..LANES-R-1 are used.

    The radius is a constexpr, so the 2R+1 offsets unroll; the two maps travel joined, one
    gather (one shared-memory round trip, two barriers) per offset instead of two."""
    lane = tl.arange(0, LANES)
    joined = tl.join(qt, qs)
    h_t = tl.zeros([LANES], tl.float32)
    h_s = tl.zeros([LANES], tl.float32)
    h_tt = tl.zeros([LANES], tl.float32)
    h_ss = tl.zeros([LANES], tl.float32)
    h_ts = tl.zeros([LANES], tl.float32)
    for d in tl.static_range(-R, R + 1):
        # the halo lanes' own sums are never used, so clamping their sources is harmless
        src = tl.minimum(tl.maximum(lane + d, 0), LANES - 1)
        a, b = tl.split(tl.gather(joined, tl.broadcast_to(src[:, None], (LANES, 2)), 0))
        h_t += a
        h_s += b
        h_tt += a * a
        h_ss += b * b
        h_ts += a * b
    return h_t, h_s, h_tt, h_ss, h_ts


@triton.jit
def ssim_weight(sum_t, sum_s, sum_tt, sum_ss, sum_ts, count, gamma):
    """clamp(SSIM, 0, 1) ** gamma from the window sums of count pixels."""
    inv_count = 1.0 / count
    mu_t = sum_t * inv_count
    mu_s = sum_s * inv_count
    var_t = sum_tt * inv_count - mu_t * mu_t
    var_s = sum_ss * inv_count - mu_s * mu_s
    cov = sum_ts * inv_count - mu_t * mu_s
    ssim = ((2.0 * mu_t * mu_s + _C1) * (2.0 * cov + _C2)) / (
        (mu_t * mu_t + mu_s * mu_s + _C1) * (var_t + var_s + _C2))
    # Clamp with comparisons: min/max may drop a NaN, which must reach the loss.
    w = tl.where(ssim < 0.0, 0.0, tl.where(ssim > 1.0, 1.0, ssim))
    return tl.where(w > 0.0, tl.exp2(gamma * fast_log2(w)), w)


@triton.jit
def kd_ssim_kernel(s_ptr, t_ptr, out_ptr, part_ptr,
                   C, H, W, inv_t, gamma, inv_map_t, strips, chunks, chunk_rows,
                   s_n, s_c, s_h, s_w, t_n, t_c, t_h, t_w, o_n, o_h, o_w,
                   C_P: tl.constexpr, LANES: tl.constexpr, RING: tl.constexpr, R: tl.constexpr,
                   CLASSES_LAST: tl.constexpr,
                   WITH_LOSS: tl.constexpr, STORE_WEIGHT: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // (strips * chunks)).to(tl.int64)  # image offsets may pass 2**31
    chunk = pid // strips % chunks  # neighbouring strips run together and share their halo
    lane = tl.arange(0, LANES)
    x = pid % strips * (LANES - 2 * R) - R + lane
    x_in = (x >= 0) & (x < W)
    owned = (lane >= R) & (lane < LANES - R) & (x < W)
    col_count = (tl.minimum(x + R, W - 1) - tl.maximum(x - R, 0) + 1).to(tl.float32)
    s_img = s_ptr + n * s_n
    t_img = t_ptr + n * t_n
    y_first = chunk * chunk_rows
    y_end = tl.minimum(y_first + chunk_rows, H)

    slot = tl.arange(0, RING)[:, None]
    ring_t = tl.zeros([RING, LANES], tl.float32)
    ring_s = tl.zeros([RING, LANES], tl.float32)
    ring_tt = tl.zeros([RING, LANES], tl.float32)
    ring_ss = tl.zeros([RING, LANES], tl.float32)
    ring_ts = tl.zeros([RING, LANES], tl.float32)
    acc_wkl = tl.zeros([LANES], tl.float32)
    acc_w = tl.zeros([LANES], tl.float32)
    # a while loop: triton 3.6's interpreter cannot take a range() bound computed from arguments
    # column offsets once; row offsets and counts from the scalar row index (uniform arithmetic);
    # channels-last without padded classes: compile-time strides (see kd_pixel_kernel)
    if CLASSES_LAST:
        s_w = C_P
        t_w = C_P
    s_col = x * s_w
    t_col = x * t_w
    o_col = x * o_w
    map_k = LOG2E * inv_map_t
    i = 0
    newest_slot = 0  # i mod (2R + 1), kept by a wrap: a division by 2R + 1 costs ~20 instructions a row
    while i < chunk_rows + 2 * R:
        y_row = y_first - R + i
        # a row index per lane for the masks: some interpreters turn a tensor & a scalar bool into integers
        y = y_row + tl.zeros([LANES], tl.int32)
        row_in = x_in & (y >= 0) & (y < H)
        zs_row = load_logits(s_img, y_row * s_h + s_col, s_c, C, row_in, C_P)
        zt_row = load_logits(t_img, y_row * t_h + t_col, t_c, C, row_in, C_P)
        qs = tl.where(row_in, foreground(zs_row, map_k, C, C_P), 0.0)
        qt = tl.where(row_in, foreground(zt_row, map_k, C, C_P), 0.0)
        h_t, h_s, h_tt, h_ss, h_ts = horizontal_sums(qt, qs, R, LANES)
        newest = slot == newest_slot
        ring_t = tl.where(newest, h_t[None, :], ring_t)
        ring_s = tl.where(newest, h_s[None, :], ring_s)
        ring_tt = tl.where(newest, h_tt[None, :], ring_tt)
        ring_ss = tl.where(newest, h_ss[None, :], ring_ss)
        ring_ts = tl.where(newest, h_ts[None, :], ring_ts)

        if i >= 2 * R:  # the window of row y - R is complete
            yo = y_row - R
            row_count = (tl.minimum(yo + R, H - 1) - tl.maximum(yo - R, 0) + 1).to(tl.float32)
            valid = owned & (y - R < y_end)
            w = ssim_weight(tl.sum(ring_t, axis=0), tl.sum(ring_s, axis=0), tl.sum(ring_tt, axis=0),
                            tl.sum(ring_ss, axis=0), tl.sum(ring_ts, axis=0), row_count * col_count, gamma)
            w = tl.where(valid, w, 0.0)
            if STORE_WEIGHT:
                tl.store(out_ptr + n * o_n + yo * o_h + o_col, w, mask=valid)
            if WITH_LOSS:
                zs = load_logits(s_img, yo * s_h + s_col, s_c, C, valid, C_P)
                zt = load_logits(t_img, yo * t_h + t_col, t_c, C, valid, C_P)
                acc_wkl += weighted_kl(zs, zt, w, LOG2E * inv_t, C, C_P)
                acc_w += w
        i += 1
        newest_slot += 1
        if newest_slot == 2 * R + 1:
            newest_slot = 0

    if WITH_LOSS:
        tl.store(part_ptr + pid, tl.sum(acc_wkl, axis=0))
        tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(acc_w, axis=0))


# ---------------------------------------------------------------- host side: plan and launches
TRITON_WEIGHT_MODES = ("none", "agree", "ssim")  # weight modes with a kernel of their own
PIXEL_PHASES = {"loss": LOSS.value, "grad": GRAD.value, "weight_map": WEIGHT_MAP.value}
SSIM_PHASES = {"loss": dict(WITH_LOSS=True, STORE_WEIGHT=False),
               "loss_and_weight": dict(WITH_LOSS=True, STORE_WEIGHT=True),
               "weight_map": dict(WITH_LOSS=False, STORE_WEIGHT=True)}
PIXEL_LANES = 4096   # classes x pixels per program: 2048 pixels at C = 2, 8 per thread
PIXEL_WARPS = 8
SSIM_LANES = 128     # columns of a strip, one per thread
SSIM_WARPS = 4
# Left to itself, ptxas holds the widest-window channels-last ssim kernels to 168 registers
# (three CTAs) and spills; with the ceiling at 255 it takes ~200, spill-free, at two CTAs.
SSIM_MAX_REGISTERS = 255
SSIM_CHUNK_ROWS = 64  # rows per program: the 2R halo rows re-read per chunk cost 2R/64
INT32_LIMIT = 2 ** 31


def pixel_tile(c_pad: int, width: int, rows_contiguous: bool):
    """(ROWS, COLS) of a pixel-kernel tile: whole rows up to the lane budget. Where a tile row is
    not one contiguous run (strided views, channels-last other than `classes_last`) every element
    needs its own 64-bit address, so the tile is halved to stay within 128 registers (two 8-warp
    CTAs, no spills)."""
    lanes = PIXEL_LANES // c_pad // (1 if rows_contiguous else 2)
    cols = min(triton.next_power_of_2(width), lanes)
    return lanes // cols, cols


def classes_last(c, c_pad, *logits) -> bool:
    """Whether every logit tensor is channels-last with no padded class (stride 1 along C, C
    along W), which the kernels then address with compile-time strides: a row's elements are
    then contiguous, as in NCHW."""
    return c == c_pad and all(x.stride(1) == 1 and x.stride(3) == c for x in logits)


def ssim_ring(window: int) -> int:
    """Rows of the register ring of window sums: the window, padded to a power of two."""
    return triton.next_power_of_2(window)


def _image_strides(x: torch.Tensor, name: str):
    """x's strides, after checking that offsets inside one image stay below 2**31."""
    span = sum((size - 1) * stride for size, stride in zip(x.shape[1:], x.stride()[1:]))
    if span >= INT32_LIMIT:
        raise ValueError(f"{name}: one image spans {span + 1} elements in memory; the kernels index "
                         "within an image in int32 (2**31 elements)")
    return x.stride()


def plan(student, teacher, phase, mode, *, weight=None, out=None, scale=None,
         temperature=1.0, window=7, gamma=1.0, map_temperature=1.0):
    """The Launch for a phase and weight `mode` ("none" | "agree" | "ssim" | "tensor", the last
    with `weight`). Phases: "loss" | "grad" | "weight_map" for the pixel kernel, "loss" |
    "loss_and_weight" | "weight_map" for ssim. `out` receives the gradient or the weight map;
    a phase with a loss allocates its partial sums (Launch.parts)."""
    n, c, h, w = student.shape
    c_pad = triton.next_power_of_2(c)
    strides = _image_strides(student, "student_logits") + _image_strides(teacher, "teacher_logits")
    out_strides = (0, 0, 0, 0) if out is None else (
        _image_strides(out, "gradient") if out.dim() == 4 else _with_class_stride(_image_strides(out, "weight map")))
    # pointers a phase never touches still need a tensor
    out = student if out is None else out
    scale = student if scale is None else scale
    if mode == "ssim":
        radius = window // 2
        strips = triton.cdiv(w, SSIM_LANES - 2 * radius)
        chunk_rows = min(SSIM_CHUNK_ROWS, h)
        chunks = triton.cdiv(h, chunk_rows)
        grid = n * strips * chunks
        parts = _parts(student, grid, SSIM_PHASES[phase]["WITH_LOSS"])
        o_n, _, o_h, o_w = out_strides
        args = (student, teacher, out, parts, c, h, w, 1.0 / temperature, float(gamma), 1.0 / map_temperature,
                strips, chunks, chunk_rows, *strides, o_n, o_h, o_w)
        # the radius a constexpr: the window's offsets unroll (a binary per window)
        constexprs = dict(C_P=c_pad, LANES=SSIM_LANES, RING=ssim_ring(window), R=radius,
                          CLASSES_LAST=classes_last(c, c_pad, student, teacher), **SSIM_PHASES[phase])
        kernel, options = kd_ssim_kernel, dict(num_warps=SSIM_WARPS, maxnreg=SSIM_MAX_REGISTERS)
    else:
        compile_time_strides = classes_last(c, c_pad, student, teacher, *([out] if phase == "grad" else []))
        # channels-last with compile-time strides loads a tile row as one run (`classes_last_rows`)
        rows_contiguous = compile_time_strides or (student.stride(3) == 1 and teacher.stride(3) == 1)
        rows, cols = pixel_tile(c_pad, w, rows_contiguous)
        tiles_h, tiles_w = triton.cdiv(h, rows), triton.cdiv(w, cols)
        grid = n * tiles_h * tiles_w
        parts = _parts(student, grid, phase == "loss")
        weight_strides = (0, 0, 0) if weight is None else _image_strides(weight, "weight")
        weight = student if weight is None else weight
        args = (student, teacher, weight, out, parts, scale, c, h, w, 1.0 / temperature, tiles_h, tiles_w,
                *strides, *weight_strides, *out_strides)
        # only the agreement weight shares its t = 1 softmax with the loss
        constexprs = dict(C_P=c_pad, ROWS=rows, COLS=cols, WEIGHT=WEIGHT_CODES[mode], PHASE=PIXEL_PHASES[phase],
                          T_IS_ONE=mode == "agree" and temperature == 1.0,
                          CLASSES_LAST=compile_time_strides)
        kernel, options = kd_pixel_kernel, dict(num_warps=PIXEL_WARPS)
    if grid >= INT32_LIMIT:
        raise ValueError(f"logits of shape {tuple(student.shape)} need {grid} programs; at most 2**31 - 1")
    return Launch(kernel, grid, args, constexprs, options, None if parts is student else parts)


def _with_class_stride(strides_nhw):
    n, h, w = strides_nhw
    return n, 0, h, w


def _parts(student, grid, with_loss):
    if not with_loss:
        return student
    return torch.empty(2, grid, dtype=torch.float32, device=student.device)


def weight_map(student, teacher, mode, window, gamma, map_temperature=1.0):
    """(N, H, W) float32 weight of a mode in TRITON_WEIGHT_MODES."""
    n, _, h, w = student.shape
    if mode == "none":
        return torch.ones((n, h, w), dtype=torch.float32, device=student.device)
    out = torch.empty((n, h, w), dtype=torch.float32, device=student.device)
    plan(student, teacher, "weight_map", mode, out=out, window=window, gamma=gamma,
         map_temperature=map_temperature)()
    return out


def loss_and_z(student, teacher, weight, temperature, reduction, window, gamma, map_temperature=1.0,
               keep_weight=False):
    """The loss (0-dim float32 device tensor), Z (a float, or a 0-dim device tensor) and, with
    `keep_weight` and the ssim weight, its (N, H, W) float32 map for the backward (else None).

    `weight` is a mode in TRITON_WEIGHT_MODES or an (N, H, W) tensor of any strides and dtype.
    """
    n, _, h, w = student.shape
    mode = weight if isinstance(weight, str) else "tensor"
    kept = None
    if mode == "ssim" and keep_weight:
        kept = torch.empty((n, h, w), dtype=torch.float32, device=student.device)
    launch = plan(student, teacher, "loss" if kept is None else "loss_and_weight", mode,
                  weight=None if mode != "tensor" else weight, out=kept,
                  temperature=temperature, window=window, gamma=gamma, map_temperature=map_temperature)
    launch()
    parts = launch.parts
    if reduction == "sum":
        z = 1.0
    elif reduction == "mean" or mode == "none":  # with w = 1 the weighted mean is the mean
        z = float(n * h * w)
    else:
        z = parts[1].sum().clamp_min(Z_EPS)
    return temperature * temperature * parts[0].sum() / z, z, kept


def gradient(student, teacher, weight, scale, temperature):
    """w * scale * (pS - pT) in the student's dtype and memory format; `scale` a 0-dim float32
    tensor, `weight` "none" | "agree" or an (N, H, W) tensor (the ssim map kept by the forward)."""
    mode = weight if isinstance(weight, str) else "tensor"
    grad = torch.empty_like(student)  # preserves channels-last and any other dense layout
    plan(student, teacher, "grad", mode, weight=None if mode != "tensor" else weight, out=grad,
         scale=scale, temperature=temperature)()
    return grad
