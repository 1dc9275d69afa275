"""Triton kernel of the KD loss with the structural (ssim) weight.

The weight of a pixel needs the foreground maps qT, qS of its window x window box (radius R),
which no single pixel holds. A program owns a strip of LANES columns (LANES - 2R of them its
own, R of halo on each side) and a chunk of rows of one image, and walks down the rows:

1. load input row y once, compute qT, qS at the map temperature (zero outside the image);
2. horizontal window sums of qT, qS, qT^2, qS^2, qT*qS by 2R+1 gathers along the row
   (`tl.gather`, lowered through shared memory, never a global scratch buffer);
3. keep the last 2R+1 rows of those sums in a register ring (RING >= 2R+1 rows, padded to a
   power of two, the padding rows zero): the vertical sum is a sum over the ring's axis;
4. once the ring holds rows y-2R..y, the window of output row y-R is complete: its SSIM weight
   follows; the program stores it (STORE_WEIGHT) and, for the loss (WITH_LOSS), reads that
   row's logits again (R rows after the first read, from L1/L2, not DRAM) for the partial sums.

The gradient pass does not run this kernel again: the SSIM weight costs hundreds of
instructions a pixel, far more than the pixel kernel's pass over a stored weight map, so the
training forward stores the map and the backward reads it (`bench/kd_traffic.py` counts the bytes).

Each logit comes from DRAM once, apart from the 2R halo rows at the ends of a chunk and the
2R halo columns of a strip (see `bench/kd_traffic.py`). Sums are direct sums of at most 2R+1 terms,
as accurate as the window allows in float32; no running sums that drift down the image.
"""
import triton
import triton.language as tl

from .kd_reference import SSIM_C1, SSIM_C2
from .kd_tiles import LOG2E, fast_log2, foreground, load_logits, weighted_kl

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
