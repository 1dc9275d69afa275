"""Modelled DRAM traffic of the KD kernels, in bytes, against each mode's minimum.

A "unit" is one logit tensor, N*C*H*W elements of the input dtype. Minimum of a training step
(loss and student gradient): read both logit tensors once and write the gradient once, 3 units,
reachable only by a single pass that knows grad_output before it starts. Under autograd the
loss comes first and grad_output later, so the kernels make two passes: forward reads 2 units,
backward reads 2 and writes 1, 5 units in all; saving a gradient in forward and rescaling it in
backward would also move 5 (1 written, 1 read, 1 written again) and round twice.
On top of that, the ssim kernel re-reads 2R halo rows per chunk of rows from DRAM (counted
here), and its 2R halo columns per strip come from L2 while neighbouring strips run together
(not counted, listed as `l2_halo_bytes`); its loss row is read a second time R rows after the
first, from L1/L2. The ssim forward writes its float32 weight map (N*H*W*4) and the backward,
the pixel kernel, reads it back instead of recomputing the weight; a caller's weight tensor
likewise adds N*H*W*itemsize to each pass.
"""
from kernels.kd_triton import SSIM_CHUNK_ROWS, SSIM_LANES


def kd_traffic(shape, itemsize, mode, window=7, weight_itemsize=4):
    """Modelled and minimum bytes of the forward, backward and whole training step."""
    n, c, h, w = shape
    unit = n * c * h * w * itemsize
    weight = n * h * w * weight_itemsize if mode in ("tensor", "ssim") else 0
    halo_dram = halo_l2 = 0.0
    if mode == "ssim":
        r = window // 2
        chunk = min(SSIM_CHUNK_ROWS, h)
        halo_dram = 2 * r / chunk                   # per logit read, as a fraction of a unit
        halo_l2 = 2 * r / (SSIM_LANES - 2 * r)
    forward = 2 * unit * (1 + halo_dram) + weight  # ssim: the map written, else the tensor read
    backward = 2 * unit + weight + unit
    if mode == "ssim":  # the minimum keeps the weight in registers: none of its bytes
        weight = 0
    return {
        "unit_bytes": unit,
        "forward_bytes": round(forward),
        "backward_bytes": round(backward),
        "step_bytes": round(forward + backward),
        "step_min_bytes": 3 * unit + weight,
        "forward_min_bytes": 2 * unit + weight,
        "l2_halo_bytes": round(2 * unit * halo_l2),
        "step_over_min": (forward + backward) / (3 * unit + weight),
    }
