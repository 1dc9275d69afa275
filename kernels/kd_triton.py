"""Host side of the Triton KD kernels: which kernel and tile a call takes, and its launches.

Forward and backward are separate passes over the logits (see `kd_loss.py` for why):
- `loss_and_z`: partial sums of w*KL and w per program, summed by torch (deterministic, no
  atomics); returns the loss and Z as device values, never read on the host. With the ssim
  weight and a gradient to come, the same pass stores the weight map for the backward;
- `gradient`: the pixel kernel's GRAD phase, w * scale * (pS - pT) with scale =
  grad_output * t / Z read from device memory, written in the student's memory format;
- `weight_map`: the weight map alone.
`plan` is the single place that decides kernel, tile, grid and meta-parameters; the launches
and `bench.compile_check` (ahead-of-time compile for sm_90/sm_80) both go through it.
"""
import torch
import triton

from .kd_pixel_kernel import WEIGHT_CODES, kd_pixel_kernel
from .kd_reference import Z_EPS
from .kd_ssim_kernel import kd_ssim_kernel
from .kd_tiles import GRAD, LOSS, WEIGHT_MAP
from .launch import Launch

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
        # channels-last with compile-time strides loads a tile row as one run (`kd_tiles.classes_last_rows`)
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
