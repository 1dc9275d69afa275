"""Triton kernels of the weighted knowledge-distillation loss (SPEC sections 4 and 8).

The loss is memory bound: per pixel it reads 2*C logits and writes C gradients, with a few
exponentials in between. So the kernels are built around touching each logit once:

- `_kd_pixel_kernel` (weights none, agree, or a caller's tensor): each program takes a block
  of pixels of one image and loads a (C_P, BLOCK) tile per input, classes padded to a power of
  two with -inf. Along a class row the pixels are contiguous, so loads are coalesced and
  vectorised. One pass computes both tempered softmaxes, the per-pixel KL, the weight (the
  agreement weight is per pixel, so it is fused), the per-program partial sums of w*KL and w,
  and the student gradient t*w*(pS - pT)*scale in the input dtype. No full-size intermediate.
- `_kd_ssim_kernel` (weight ssim): the structural weight needs the foreground probabilities of
  a (2r+1)^2 neighbourhood, which a pixel-block program does not hold. The two obvious
  alternatives cost full-size round trips through DRAM: writing qT and qS maps (8 bytes per
  pixel written and read again) and then re-reading the logits for the loss, or a separable
  box filter over the five moment maps (qT, qS, qT^2, qS^2, qT*qS: 20 bytes per pixel each
  way). Instead each program owns a 2-D halo tile, TILE_H x TILE_W pixels whose inner
  (TILE_H-2r) x (TILE_W-2r) pixels it is responsible for. It reads the tile's logits once,
  computes qT, qS, runs the separable box filter (horizontal then vertical, 2*(2r+1) and
  5*(2r+1) loads per pixel instead of 2*(2r+1)^2 for a direct window) through a small scratch
  slab private to the program, and then finishes the loss and gradient for the inner pixels
  from the logits still in registers. The grid is persistent (a few programs per SM looping
  over tiles), so the scratch is a few tens of MB that stays resident in L2, and neighbouring
  tiles run together, so the halo re-reads (about 30 % for 7 x 7 windows) are L2 hits rather
  than DRAM traffic. DRAM traffic is therefore close to the minimum: logits in once, gradient
  out once. Barriers order the scratch writes and reads within a program; a program's scratch
  is never touched by another.

Partial sums are per program and summed by torch afterwards: deterministic, no atomics.
Whatever scale is known before launch (t, and 1/Z) is folded into the stored gradient, which
the backward pass then returns untouched when grad_output is 1. Only for reduction
"weighted_mean" with an agree or ssim weight is Z = sum w unknown until the pass ends; there
the backward pass multiplies by grad_output / Z, one more read and write of the gradient.
"""
import torch
import triton
import triton.language as tl

from .backend import INTERPRET
from .kd_reference import SSIM_C1, SSIM_C2, Z_EPS

WEIGHT_CODES = {"none": 0, "agree": 1, "tensor": 2}
_NONE = tl.constexpr(0)
_AGREE = tl.constexpr(1)
_C1 = tl.constexpr(SSIM_C1)
_C2 = tl.constexpr(SSIM_C2)
_SLOTS = tl.constexpr(7)  # ssim scratch: qT, qS, then horizontal sums of qT, qS, qT^2, qS^2, qT*qS
# Persistent ssim grid. Compiled for sm_90 the ssim kernel needs about 200 registers a thread,
# so one or two 8-warp programs fit on an SM; more would only enlarge the scratch.
_PROGRAMS_PER_SM = 2


@triton.jit
def _load_logits(ptr, base, pix, pix_mask, C, HW, C_P: tl.constexpr):
    """(C_P, BLOCK) float32 tile of one image's logits; padded classes are -inf."""
    cls = tl.arange(0, C_P)[:, None]
    # Out-of-range pixels read 0, not -inf, so that their softmax stays finite.
    z = tl.load(ptr + base + cls * HW + pix[None, :], mask=(cls < C) & pix_mask[None, :], other=0.0)
    return tl.where(cls < C, z.to(tl.float32), float("-inf"))


@triton.jit
def _softmax(z):
    """Softmax and log-softmax over axis 0 of a (C_P, BLOCK) tile."""
    shifted = z - tl.max(z, axis=0)[None, :]
    e = tl.exp(shifted)
    total = tl.sum(e, axis=0)
    return e * (1.0 / total)[None, :], shifted - tl.log(total)[None, :]


@triton.jit
def _kl(pt, log_pt, log_ps, C, C_P: tl.constexpr):
    cls = tl.arange(0, C_P)[:, None]
    # Padded classes give 0 * (-inf + inf); real classes keep their NaN/Inf.
    return tl.sum(tl.where(cls < C, pt * (log_pt - log_ps), 0.0), axis=0)


@triton.jit
def _foreground(p, C, C_P: tl.constexpr):
    """Mean probability of the classes 1..C-1 of a (C_P, BLOCK) tile."""
    cls = tl.arange(0, C_P)[:, None]
    return tl.sum(tl.where((cls >= 1) & (cls < C), p, 0.0), axis=0) / (C - 1)


@triton.jit
def _store_grad(grad_ptr, base, pix, pix_mask, diff, w, scale, C, HW, C_P: tl.constexpr):
    """Store diff * w * scale, where diff = pS - pT is a (C_P, BLOCK) tile."""
    cls = tl.arange(0, C_P)[:, None]
    g = diff * (w * scale)[None, :]
    tl.store(grad_ptr + base + cls * HW + pix[None, :], g.to(grad_ptr.dtype.element_ty),
             mask=(cls < C) & pix_mask[None, :])


@triton.jit
def _kd_pixel_kernel(s_ptr, t_ptr, w_ptr, grad_ptr, w_out_ptr, part_ptr, scale_ptr,
                     C, HW, inv_t,
                     C_P: tl.constexpr, BLOCK: tl.constexpr, WEIGHT: tl.constexpr,
                     T_IS_ONE: tl.constexpr, WITH_LOSS: tl.constexpr, STORE_GRAD: tl.constexpr,
                     STORE_WEIGHT: tl.constexpr):
    blk = tl.program_id(0)
    n = tl.program_id(1)
    pix = blk * BLOCK + tl.arange(0, BLOCK)
    pix_mask = pix < HW
    base = n.to(tl.int64) * C * HW
    zs = _load_logits(s_ptr, base, pix, pix_mask, C, HW, C_P)
    zt = _load_logits(t_ptr, base, pix, pix_mask, C, HW, C_P)
    ps, log_ps = _softmax(zs * inv_t)
    pt, log_pt = _softmax(zt * inv_t)

    if WEIGHT == _NONE:
        w = tl.full([BLOCK], 1.0, tl.float32)
    elif WEIGHT == _AGREE:  # agreement is defined at t = 1
        if T_IS_ONE:
            ps1 = ps
            pt1 = pt
        else:
            ps1, _ = _softmax(zs)
            pt1, _ = _softmax(zt)
        w = 1.0 - 0.5 * tl.sum(tl.abs(pt1 - ps1), axis=0)
    else:
        w = tl.load(w_ptr + n.to(tl.int64) * HW + pix, mask=pix_mask, other=0.0).to(tl.float32)
    w = tl.where(pix_mask, w, 0.0)
    if STORE_WEIGHT:
        tl.store(w_out_ptr + n.to(tl.int64) * HW + pix, w, mask=pix_mask)

    if WITH_LOSS:
        kl = _kl(pt, log_pt, log_ps, C, C_P)
        n_prog = tl.num_programs(0) * tl.num_programs(1)
        prog = n * tl.num_programs(0) + blk
        tl.store(part_ptr + prog, tl.sum(w * kl, axis=0))
        tl.store(part_ptr + n_prog + prog, tl.sum(w, axis=0))
        if STORE_GRAD:
            _store_grad(grad_ptr, base, pix, pix_mask, ps - pt, w, tl.load(scale_ptr), C, HW, C_P)


@triton.jit
def _ssim_weight(sum_t, sum_s, sum_tt, sum_ss, sum_ts, count, gamma):
    mu_t = sum_t / count
    mu_s = sum_s / count
    var_t = sum_tt / count - mu_t * mu_t
    var_s = sum_ss / count - mu_s * mu_s
    cov = sum_ts / count - mu_t * mu_s
    ssim = ((2.0 * mu_t * mu_s + _C1) * (2.0 * cov + _C2)) / (
        (mu_t * mu_t + mu_s * mu_s + _C1) * (var_t + var_s + _C2))
    # Clamp with comparisons: min/max may drop a NaN, which must reach the loss.
    w = tl.where(ssim < 0.0, 0.0, tl.where(ssim > 1.0, 1.0, ssim))
    return tl.where(w > 0.0, tl.exp2(gamma * tl.log2(w)), w)


@triton.jit
def _kd_ssim_kernel(s_ptr, t_ptr, grad_ptr, w_out_ptr, part_ptr, scale_ptr, scratch_ptr,
                    C, H, W, inv_t, gamma, tiles_y, tiles_x, n_tiles,
                    C_P: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                    R: tl.constexpr, T_IS_ONE: tl.constexpr, WITH_LOSS: tl.constexpr,
                    STORE_GRAD: tl.constexpr, STORE_WEIGHT: tl.constexpr):
    LANES: tl.constexpr = TILE_H * TILE_W
    prog = tl.program_id(0)
    n_prog = tl.num_programs(0)
    lane = tl.arange(0, LANES)
    row = lane // TILE_W
    col = lane % TILE_W
    inner = (row >= R) & (row < TILE_H - R) & (col >= R) & (col < TILE_W - R)
    scratch = scratch_ptr + prog.to(tl.int64) * (_SLOTS * LANES)
    HW = H * W
    acc_wkl = tl.zeros([LANES], dtype=tl.float32)
    acc_w = tl.zeros([LANES], dtype=tl.float32)

    for tile in range(prog, n_tiles, n_prog):
        n = tile // (tiles_y * tiles_x)
        y = (tile // tiles_x) % tiles_y * (TILE_H - 2 * R) - R + row
        x = tile % tiles_x * (TILE_W - 2 * R) - R + col
        in_image = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        pix = y * W + x
        base = n.to(tl.int64) * C * HW
        zs = _load_logits(s_ptr, base, pix, in_image, C, HW, C_P)
        zt = _load_logits(t_ptr, base, pix, in_image, C, HW, C_P)
        ps, log_ps = _softmax(zs * inv_t)
        pt, log_pt = _softmax(zt * inv_t)
        if T_IS_ONE:
            ps1 = ps
            pt1 = pt
        else:
            ps1, _ = _softmax(zs)
            pt1, _ = _softmax(zt)
        # Pixels outside the image are zeros, so window sums cover in-image pixels only.
        qt = tl.where(in_image, _foreground(pt1, C, C_P), 0.0)
        qs = tl.where(in_image, _foreground(ps1, C, C_P), 0.0)
        # Only the KL and pS - pT stay live through the window sums: fewer registers than logits.
        kl = _kl(pt, log_pt, log_ps, C, C_P)
        diff = ps - pt

        tl.debug_barrier()  # the previous tile has finished reading the scratch
        tl.store(scratch + lane, qt)
        tl.store(scratch + LANES + lane, qs)
        tl.debug_barrier()
        h_t = tl.zeros([LANES], dtype=tl.float32)
        h_s = tl.zeros([LANES], dtype=tl.float32)
        h_tt = tl.zeros([LANES], dtype=tl.float32)
        h_ss = tl.zeros([LANES], dtype=tl.float32)
        h_ts = tl.zeros([LANES], dtype=tl.float32)
        for d in tl.static_range(2 * R + 1):
            ok = (col + (d - R) >= 0) & (col + (d - R) < TILE_W)
            a = tl.load(scratch + lane + (d - R), mask=ok, other=0.0)
            b = tl.load(scratch + LANES + lane + (d - R), mask=ok, other=0.0)
            h_t += a
            h_s += b
            h_tt += a * a
            h_ss += b * b
            h_ts += a * b
        tl.store(scratch + 2 * LANES + lane, h_t)
        tl.store(scratch + 3 * LANES + lane, h_s)
        tl.store(scratch + 4 * LANES + lane, h_tt)
        tl.store(scratch + 5 * LANES + lane, h_ss)
        tl.store(scratch + 6 * LANES + lane, h_ts)
        tl.debug_barrier()
        v_t = tl.zeros([LANES], dtype=tl.float32)
        v_s = tl.zeros([LANES], dtype=tl.float32)
        v_tt = tl.zeros([LANES], dtype=tl.float32)
        v_ss = tl.zeros([LANES], dtype=tl.float32)
        v_ts = tl.zeros([LANES], dtype=tl.float32)
        for d in tl.static_range(2 * R + 1):
            ok = (row + (d - R) >= 0) & (row + (d - R) < TILE_H)
            at = scratch + lane + (d - R) * TILE_W
            v_t += tl.load(at + 2 * LANES, mask=ok, other=0.0)
            v_s += tl.load(at + 3 * LANES, mask=ok, other=0.0)
            v_tt += tl.load(at + 4 * LANES, mask=ok, other=0.0)
            v_ss += tl.load(at + 5 * LANES, mask=ok, other=0.0)
            v_ts += tl.load(at + 6 * LANES, mask=ok, other=0.0)
        count = ((tl.minimum(y + R, H - 1) - tl.maximum(y - R, 0) + 1)
                 * (tl.minimum(x + R, W - 1) - tl.maximum(x - R, 0) + 1)).to(tl.float32)
        valid = in_image & inner
        w = tl.where(valid, _ssim_weight(v_t, v_s, v_tt, v_ss, v_ts, count, gamma), 0.0)
        if STORE_WEIGHT:
            tl.store(w_out_ptr + n.to(tl.int64) * HW + pix, w, mask=valid)

        if WITH_LOSS:
            acc_wkl += tl.where(valid, w * kl, 0.0)
            acc_w += w
            if STORE_GRAD:
                _store_grad(grad_ptr, base, pix, valid, diff, w, tl.load(scale_ptr), C, HW, C_P)

    if WITH_LOSS:
        tl.store(part_ptr + prog, tl.sum(acc_wkl, axis=0))
        tl.store(part_ptr + n_prog + prog, tl.sum(acc_w, axis=0))


def _pixel_block(c_pad: int) -> int:
    return 4096 // c_pad  # 2048 pixels for C = 2: 8 per thread, two 16-byte loads per class


def _ssim_tile(c_pad: int, radius: int):
    """Halo tile (TILE_H, TILE_W): at least twice the window so that most lanes are inner."""
    span = triton.next_power_of_2(2 * (2 * radius + 1))
    return max(32 if c_pad <= 2 else 16, span), max(64, span)


def _ssim_programs(tensor: torch.Tensor, n_tiles: int) -> int:
    if INTERPRET:
        return min(n_tiles, 3)  # a few programs, each looping over several tiles
    sms = torch.cuda.get_device_properties(tensor.device).multi_processor_count
    return min(n_tiles, sms * _PROGRAMS_PER_SM)


def _launch(student, teacher, mode, *, weight=None, grad=None, w_out=None, scale=None,
            temperature=1.0, window=7, gamma=1.0, with_loss=True):
    """Run the kernel for `mode` ("none" | "agree" | "tensor" | "ssim"); return the partial sums."""
    n, c, h, w = student.shape
    c_pad = triton.next_power_of_2(c)
    flags = dict(C_P=c_pad, T_IS_ONE=temperature == 1.0, WITH_LOSS=with_loss,
                 STORE_GRAD=grad is not None, STORE_WEIGHT=w_out is not None)
    # Pointers a configuration never touches still need a tensor argument.
    weight = student if weight is None else weight
    grad = student if grad is None else grad
    w_out = student if w_out is None else w_out
    scale = student if scale is None else scale
    inv_t = 1.0 / temperature
    if mode == "ssim":
        radius = window // 2
        tile_h, tile_w = _ssim_tile(c_pad, radius)
        tiles_y, tiles_x = triton.cdiv(h, tile_h - 2 * radius), triton.cdiv(w, tile_w - 2 * radius)
        n_tiles = n * tiles_y * tiles_x
        n_prog = _ssim_programs(student, n_tiles)
        parts = torch.empty(2, n_prog, dtype=torch.float32, device=student.device)
        scratch = torch.empty(n_prog * _SLOTS.value * tile_h * tile_w, dtype=torch.float32,
                              device=student.device)
        _kd_ssim_kernel[(n_prog,)](
            student, teacher, grad, w_out, parts, scale, scratch,
            c, h, w, inv_t, float(gamma), tiles_y, tiles_x, n_tiles,
            TILE_H=tile_h, TILE_W=tile_w, R=radius, num_warps=8, **flags)
    else:
        block = _pixel_block(c_pad)
        grid = (triton.cdiv(h * w, block), n)
        parts = torch.empty(2, grid[0] * grid[1], dtype=torch.float32, device=student.device)
        _kd_pixel_kernel[grid](
            student, teacher, weight, grad, w_out, parts, scale,
            c, h * w, inv_t, BLOCK=block, WEIGHT=WEIGHT_CODES[mode], num_warps=8, **flags)
    return parts


def weight_map(student, teacher, mode, window=7, gamma=1.0):
    """(N, H, W) float32 weight of `mode` ("none" | "agree" | "ssim") for contiguous logits."""
    n, _, h, w = student.shape
    if mode == "none":
        return torch.ones((n, h, w), dtype=torch.float32, device=student.device)
    w_out = torch.empty((n, h, w), dtype=torch.float32, device=student.device)
    _launch(student, teacher, mode, w_out=w_out, window=window, gamma=gamma, with_loss=False)
    return w_out


def kd_loss_forward(student, teacher, weight, temperature, reduction, window, gamma, need_grad):
    """Loss, student gradient and the factor the backward pass still owes.

    `weight` is "none" | "agree" | "ssim" or a contiguous float32 (N, H, W) tensor. The gradient
    (None unless `need_grad`) is t*w*(pS - pT)/Z whenever Z is known before launch; when Z is
    the sum of a data-dependent weight it is t*w*(pS - pT) and the returned 0-dim tensor 1/Z is
    the factor owed (None otherwise). The loss is a 0-dim float32 tensor.
    """
    n, _, h, w = student.shape
    mode = weight if isinstance(weight, str) else "tensor"
    if reduction == "sum":
        z = 1.0
    elif reduction == "mean" or mode == "none":  # with w = 1 the weighted mean is the mean
        z = float(n * h * w)
    elif mode == "tensor":
        z = weight.sum().clamp_min(Z_EPS)
    else:
        z = None  # the sum of a weight this very pass computes
    factor = temperature / z if z is not None else temperature
    if not isinstance(factor, torch.Tensor):  # a fill, not a host-to-device copy that would sync
        factor = torch.full((), factor, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student) if need_grad else None
    parts = _launch(student, teacher, mode, weight=weight if mode == "tensor" else None,
                    grad=grad, scale=factor, temperature=temperature, window=window, gamma=gamma)
    owed = None
    if z is None:
        z = parts[1].sum().clamp_min(Z_EPS)
        owed = 1.0 / z
    loss = temperature * temperature * parts[0].sum() / z
    return loss, grad, owed
