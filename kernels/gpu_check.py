"""First run on a GPU: every kernel against its reference, then both benchmarks; one command.

    python -m kernels.gpu_check            # writes bench/gpu_check_<gpu>.json, kd_<gpu>.json, boundary_<gpu>.json

Checks, on CUDA and with the compiled kernels: loss, gradient and weight map of every weight
mode, C = 2, 3 and 8, float32 / bfloat16 / float16, contiguous and channels-last, against the
float64 reference; half-precision gradients under a loss scale of 65536 rounded once (half an
ulp, float32 slack); forward and backward with `torch.cuda.set_sync_debug_mode("error")` (no
synchronisation) and replayed from a CUDA graph; boundary metrics against the CPU path. Stops
at the first failure, before any timing. Needs nothing installed beyond the runtime
requirements; runs as it is on torch 2.11 + triton 3.6 or newer.
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
import triton

from kernels import boundary_metrics, kd_weight_map, weighted_kd_loss
from kernels.bench_boundary import largest_difference, sinus_pair
from kernels.kd_reference import kd_loss_reference, weight_map_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOSS_SCALE = 65536.0


def _logits(shape, dtype, channels_last, seed, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    student = 3 * torch.randn(shape, generator=gen, device=device)
    teacher = student + 2 * torch.randn(shape, generator=gen, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return student.to(dtype).contiguous(memory_format=fmt), teacher.to(dtype).contiguous(memory_format=fmt)


def _half_ulp(x, dtype):
    info = torch.finfo(dtype)
    return 0.5 * info.eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=info.smallest_normal))))


def check_kd(device="cuda", height=203, width=331):
    """Largest errors per configuration; raises AssertionError at the first one out of bounds."""
    rows = []
    for dtype in DTYPES:
        for channels_last in (False, True):
            for c in (2, 3, 8):
                for mode in ("none", "agree", "ssim"):
                    student, teacher = _logits((2, c, height, width), dtype, channels_last, seed=c, device=device)
                    s = student.clone().requires_grad_()
                    (weighted_kd_loss(s, teacher, weight=mode, temperature=2.0) * LOSS_SCALE).backward()
                    # the gradient against the oracle given the kernel's own float32 weight; the
                    # weight against its float64 reference separately
                    w32 = kd_weight_map(student, teacher, mode).double()
                    s64 = student.double().requires_grad_()
                    ref = kd_loss_reference(s64, teacher.double(), w32, 2.0) * LOSS_SCALE
                    ref.backward()
                    error = (s.grad.double() - s64.grad).abs()
                    factor = (LOSS_SCALE * 2.0 * w32 / w32.sum().clamp_min(1e-6))[:, None]
                    bound = _half_ulp(s64.grad, dtype) + 8 * torch.finfo(torch.float32).eps * factor
                    weight_err = float((w32 - weight_map_reference(s64, teacher.double(), mode)).abs().max())
                    row = dict(dtype=str(dtype), channels_last=channels_last, classes=c, mode=mode,
                               grad_over_bound=float((error / bound).max()), weight_abs_err=weight_err,
                               grad_layout_kept=s.grad.stride() == s.stride())
                    rows.append(row)
                    assert row["grad_over_bound"] <= 1 and weight_err < 2e-4 and row["grad_layout_kept"], row
    return rows


def check_no_sync_and_graph():
    """Forward + backward raise on any synchronisation, and replay correctly from a CUDA graph."""
    student, teacher = _logits((4, 2, 256, 512), torch.bfloat16, True, seed=5)
    s = student.clone().requires_grad_()
    for _ in range(2):  # compile the kernels before syncs are forbidden and before capture
        torch.autograd.grad(weighted_kd_loss(s, teacher), s)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        expected, = torch.autograd.grad(weighted_kd_loss(s, teacher), s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, = torch.autograd.grad(weighted_kd_loss(s, teacher), s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected), "CUDA-graph replay differs from the eager step"
    return dict(sync_free=True, cuda_graph_replay_equal=True)


def check_boundary(device="cuda", height=512, width=1024):
    rng = np.random.default_rng(1)
    pairs = [sinus_pair(rng, height, width) for _ in range(4)]
    pred = torch.from_numpy(np.stack([p for p, _ in pairs]))
    truth = torch.from_numpy(np.stack([g for _, g in pairs]))
    worst = max(largest_difference(boundary_metrics(pred.to(device), truth.to(device), spacing=(0.1, 0.1), mode=mode),
                                   boundary_metrics(pred, truth, spacing=(0.1, 0.1), mode=mode, backend="torch"))
                for mode in ("max", "pooled"))
    assert worst < 1e-3, f"boundary metrics differ from the CPU path by {worst}"
    return dict(max_abs_difference=worst)


def main():
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    name = torch.cuda.get_device_name().replace(" ", "_").lower()
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    report["kd"] = check_kd()
    report["no_sync_and_graph"] = check_no_sync_and_graph()
    report["boundary"] = check_boundary()
    os.makedirs("bench", exist_ok=True)
    with open(f"bench/gpu_check_{name}.json", "w") as f:
        json.dump(report, f, indent=1)
    print("checks passed; benchmarks next")
    for module, out, extra in (("kernels.bench_kd", f"bench/kd_{name}.json", ["--reps", "30"]),
                               ("kernels.bench_boundary", f"bench/boundary_{name}.json", [])):
        subprocess.run([sys.executable, "-m", module, "--out", out, *extra], check=True)


if __name__ == "__main__":
    main()
