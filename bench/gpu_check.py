"""First run on a GPU: every kernel against its reference, then the benchmarks; one command that
fits a bare, short-lived machine and leaves its results in one folder.

    timeout 300 python3 -m bench.gpu_check --out-dir "$OUT"     # OUT: the collected folder

Needs nothing beyond torch (2.11 or newer), triton (3.6 or newer), numpy and scipy. Writes four
files into the folder (default: $OUT), every row printed and flushed as one JSON line and appended
to its file as it is produced, so a timeout loses at most the row in progress:
- check.jsonl: the machine, the parallel pre-compile, then the checks: loss, gradient and weight
  map of every weight mode, C = 2, 3 and 8, float32 / bfloat16 / float16, contiguous and
  channels-last, against the float64 reference, half-precision gradients under a loss scale of
  65536 within half an ulp (plus float32 slack); forward and backward under
  `torch.cuda.set_sync_debug_mode("error")` and replayed from a CUDA graph; boundary metrics
  against the CPU path;
- kd_bench.jsonl: KD forward + backward times, Triton and eager torch (and `torch.compile`
  with --torch-compile, in a child process under its own time limit, since a cold compile
  takes minutes);
- boundary_bench.jsonl: the Triton boundary metrics, the CPU path, MedPy and MONAI (each only
  where it is importable, after the GPU part; otherwise recorded as absent);
- summary.jsonl: the failures (a failing step is a row, the steps after it still run) and the
  time of each step. Exit status 1 when anything failed.
Every kernel the steps will launch is recorded first and compiled in parallel worker
processes (`precompile.py`), since a cold cache would otherwise compile 163 specialisations
one after another. `--size tiny` runs the same steps at toy sizes, on the CPU through the
Triton interpreter too (the driver's test).
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np
import scipy
import torch
import triton

from bench.boundary_speed import (SPACING, gpu_timings, largest_difference, ratios, side_by_side, sinus_batch,
                                  time_cpu_path)
from bench.check_rows import Rows, machine
from bench.kd_speed import MODES, copy_bandwidth, timing_row
from bench.precompile import distinct, record_launches, warm
from kernels import boundary_metrics, kd_weight_map, weighted_kd_loss
from kernels.dispatch import INTERPRET
from kernels.kd_loss import kd_loss_reference, weight_map_reference

LOSS_SCALE = 65536.0
CHECK, KD, BOUNDARY, SUMMARY = "check.jsonl", "kd_bench.jsonl", "boundary_bench.jsonl", "summary.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZES = {
    "full": dict(check_hw=(203, 331), classes=(2, 3, 8), dtypes=tuple(DTYPES), sync_shape=(4, 2, 256, 512),
                 boundary_check=(4, 512, 1024), kd_bench=(16, 2, 512, 1024), kd_dtypes=("float32", "bfloat16"),
                 boundary_bench=(32, 1024, 2048), warmup=10, reps=30, boundary_reps=10, cpu_repeats=2,
                 library_images=4),
    "tiny": dict(check_hw=(7, 12), classes=(2, 3), dtypes=("float32", "bfloat16"), sync_shape=(1, 2, 8, 16),
                 boundary_check=(2, 24, 40), kd_bench=(1, 2, 8, 16), kd_dtypes=("float32",),
                 boundary_bench=(2, 64, 128), warmup=1, reps=2, boundary_reps=2, cpu_repeats=1, library_images=1),
}


def _logits(shape, dtype, channels_last, seed, device):
    gen = torch.Generator(device=device).manual_seed(seed)
    student = 3 * torch.randn(shape, generator=gen, device=device)
    teacher = student + 2 * torch.randn(shape, generator=gen, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return student.to(dtype).contiguous(memory_format=fmt), teacher.to(dtype).contiguous(memory_format=fmt)


def _half_ulp(x, dtype):
    info = torch.finfo(dtype)
    return 0.5 * info.eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=info.smallest_normal))))


def kd_cases(size):
    """(dtype name, channels_last, classes, mode) of every KD check."""
    return [(d, cl, c, m) for d in size["dtypes"] for cl in (False, True) for c in size["classes"] for m in MODES]


def kd_case(case, size, device, check=True):
    """One KD check of `kd_check` at the check size, one dtype and layout for both logits. With
    check=False only the calls are made (to record their launches)."""
    dtype_name, channels_last, c, mode = case
    student, teacher = _logits((2, c, *size["check_hw"]), DTYPES[dtype_name], channels_last, c, device)
    row = kd_check(student, teacher, mode, temperature=2.0, check=check)
    if row is None:
        return None
    return dict(step="kd", dtype=dtype_name, channels_last=channels_last, classes=c, mode=mode, **row)


def kd_check(student, teacher, mode, temperature=1.0, window=7, gamma=1.0, map_temperature=1.0, check=True):
    """The kernels' KD loss and student gradient for logits of any dtypes and layouts against the
    float64 oracle given the kernel's own weight: the scaled gradient within half an ulp of the
    student's dtype, the loss within 1e-3, the weight against its float64 reference, the
    gradient's layout kept. With check=False only the calls are made."""
    options = dict(window=window, gamma=gamma, map_temperature=map_temperature)
    s = student.clone().requires_grad_()
    loss = weighted_kd_loss(s, teacher, weight=mode, temperature=temperature, **options)
    (loss * LOSS_SCALE).backward()
    w32 = kd_weight_map(student, teacher, mode, **options).double()
    if not check:
        return None
    s64 = student.double().requires_grad_()
    reference = kd_loss_reference(s64, teacher.double(), w32, temperature)
    (reference * LOSS_SCALE).backward()
    error = (s.grad.double() - s64.grad).abs()
    factor = (LOSS_SCALE * temperature * w32 / w32.sum().clamp_min(1e-6))[:, None]
    # the interpreter casts float32 to bfloat16 by truncation (a GPU rounds): a whole ulp there
    rounding = 2 if INTERPRET and student.dtype == torch.bfloat16 else 1
    bound = rounding * _half_ulp(s64.grad, student.dtype) + 8 * torch.finfo(torch.float32).eps * factor
    row = dict(grad_over_bound=float((error / bound).max()),
               loss_rel_err=float((loss.detach().double() - reference.detach()).abs() / reference.detach().abs()),
               weight_abs_err=float((w32 - weight_map_reference(s64, teacher.double(), mode, **options)).abs().max()),
               grad_layout_kept=s.grad.stride() == s.stride())
    row["ok"] = (row["grad_over_bound"] <= 1 and row["loss_rel_err"] < 1e-3 and row["weight_abs_err"] < 2e-4
                 and row["grad_layout_kept"])
    return row


def sync_and_graph(size, device, record_only=False):
    """Forward + backward raise on any synchronisation, and replay correctly from a CUDA graph."""
    student, teacher = _logits(size["sync_shape"], torch.bfloat16, True, 5, device)
    s = student.clone().requires_grad_()
    torch.autograd.grad(weighted_kd_loss(s, teacher), s)
    if record_only:
        return None
    torch.autograd.grad(weighted_kd_loss(s, teacher), s)  # kernels loaded before syncs are forbidden
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
    return dict(step="sync_and_graph", sync_free=True, cuda_graph_replay_equal=torch.equal(captured, expected),
                ok=torch.equal(captured, expected))


def boundary_case(size, device, check=True):
    """Boundary metrics of the device path against the CPU path, both HD95 conventions."""
    pred, truth = sinus_batch(*size["boundary_check"], seed=1)
    on_device = boundary_metrics(pred.to(device), truth.to(device), spacing=SPACING)
    if not check:
        return None
    worst = largest_difference(on_device, boundary_metrics(pred, truth, spacing=SPACING, backend="torch"))
    return dict(step="boundary", max_abs_difference=worst, ok=worst < 1e-3)


def kd_bench_calls(size, device):
    """The Triton calls of the KD benchmark, once each (to record their launches)."""
    for dtype_name in size["kd_dtypes"]:
        for mode in MODES:
            timing_row(device, size["kd_bench"], dtype_name, mode, ["triton"], 0, 2, 0)


def boundary_bench_calls(size, device):
    batch, h, w = size["boundary_bench"]
    masks = torch.zeros((batch, h, w), dtype=torch.bool, device=device)
    boundary_metrics(masks, masks, spacing=SPACING)
    boundary_metrics(masks[0], masks[0], spacing=SPACING)


def every_launch(size, device, on_gpu):
    """Every call of the steps below that launches a kernel, once: with on_gpu, also those of
    the GPU-only steps (made on `device` all the same, to count them without a GPU)."""
    for case in kd_cases(size):
        kd_case(case, size, device, check=False)
    if on_gpu:
        sync_and_graph(size, device, record_only=True)
        kd_bench_calls(size, device)
        boundary_bench_calls(size, device)
    boundary_case(size, device, check=False)


def precompile_step(rows, size, device, on_gpu, workers):
    start = time.perf_counter()
    specs = record_launches(lambda: every_launch(size, device, on_gpu))
    row = dict(step="precompile", recorded_launches=len(specs), record_s=round(time.perf_counter() - start, 2))
    if not on_gpu:
        row["skipped"] = "no GPU: the interpreter runs the kernels, there is nothing to compile"
    else:
        specs = distinct(specs)
        row.update(warm(specs, workers))
    row["ok"] = True
    rows.emit(CHECK, row)


def kd_bench_step(rows, size, device, on_gpu):
    names = ["triton", "eager"] if on_gpu else ["eager"]
    n = 1
    for dim in size["kd_bench"]:
        n *= dim
    for dtype_name in size["kd_dtypes"]:
        copy = None
        if on_gpu:
            copy = rows.attempt(KD, f"copy/{dtype_name}", copy_bandwidth, device,
                                3 * n * DTYPES[dtype_name].itemsize, size["warmup"], size["reps"])
            if copy:
                rows.emit(KD, dict(step="copy_bandwidth", dtype=dtype_name, **copy))
        for seed, mode in enumerate(MODES):
            row = rows.attempt(KD, f"kd_bench/{dtype_name}/{mode}", timing_row, device, size["kd_bench"], dtype_name,
                               mode, names, size["warmup"], size["reps"], seed, copy)
            if row:
                rows.emit(KD, dict(step="kd_bench", **row))


def torch_compile_step(rows, out_dir, limit_s):
    """torch.compile baselines in a child process: a cold compile takes minutes, so it gets its
    own time limit, and the rows it finished are kept when it runs out."""
    command = [sys.executable, "-m", "bench.kd_speed", "--impls", "compile", "--reps", "30",
               "--rows", os.path.join(out_dir, KD)]
    try:
        proc = subprocess.run(command, timeout=limit_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"torch.compile baselines stopped at their limit of {limit_s} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"torch.compile baselines exited {proc.returncode}: {proc.stderr[-1500:]}")


def boundary_bench_step(rows, size, on_gpu):
    batch, h, w = size["boundary_bench"]
    pred, truth = sinus_batch(batch, h, w)
    gpu = None
    if on_gpu:
        gpu = rows.attempt(BOUNDARY, "boundary_bench/triton", gpu_timings, pred, truth, size["boundary_reps"])
        if gpu:
            rows.emit(BOUNDARY, dict(step="boundary_bench", path="triton", shape=[batch, h, w], **gpu))
    cpu = time_cpu_path(pred, truth, size["cpu_repeats"])
    rows.emit(BOUNDARY, dict(step="boundary_bench", path="cpu", shape=[batch, h, w], **machine(), **cpu))
    # MedPy and MONAI last: absent on a bare GPU machine, and slow where present
    compared = side_by_side(pred, truth, size["library_images"], size["cpu_repeats"])
    for name, summary in compared.items():
        rows.emit(BOUNDARY, dict(step="boundary_bench", path=f"side_by_side/{name}", shape=[h, w], **summary))
    found, arithmetic = ratios(compared, gpu)
    rows.emit(BOUNDARY, dict(step="boundary_ratios", ratios=found, arithmetic=arithmetic))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=os.environ.get("OUT"),
                        help="folder for the result files (default: $OUT)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="tiny: toy sizes, for the test")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile of the reference")
    parser.add_argument("--torch-compile-limit-s", type=float, default=150.0,
                        help="time limit of the torch.compile baselines")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling kernels ahead of the checks")
    args = parser.parse_args(argv)
    if not args.out_dir:
        parser.error("give --out-dir or set OUT")
    on_gpu = torch.cuda.is_available() and not INTERPRET
    if args.size == "full" and not on_gpu:
        parser.error("--size full needs a CUDA device (and TRITON_INTERPRET unset); use --size tiny")
    device = torch.device("cuda" if on_gpu else "cpu")
    size = SIZES[args.size]
    rows = Rows(args.out_dir)
    began = time.perf_counter()
    rows.emit(CHECK, dict(step="environment", device=torch.cuda.get_device_name() if on_gpu else "cpu (interpreter)",
                          torch=torch.__version__, triton=triton.__version__, numpy=np.__version__,
                          scipy=scipy.__version__, python=sys.version.split()[0], size=args.size, **machine()))
    steps = {}

    def timed(name, fn, *fn_args):
        start = time.perf_counter()
        rows.attempt(CHECK, name, fn, *fn_args)
        steps[name] = round(time.perf_counter() - start, 2)

    timed("precompile", precompile_step, rows, size, device, on_gpu, args.workers)

    def checks():
        for case in kd_cases(size):
            rows.check(CHECK, "kd/{}/channels_last={}/C={}/{}".format(*case), kd_case, case, size, device)
        if on_gpu:
            rows.check(CHECK, "sync_and_graph", sync_and_graph, size, device)
        else:
            rows.emit(CHECK, dict(step="sync_and_graph", skipped="needs CUDA"))
        rows.check(CHECK, "boundary", boundary_case, size, device)

    timed("checks", checks)
    timed("kd_bench", kd_bench_step, rows, size, device, on_gpu)
    if args.torch_compile:
        timed("torch_compile", torch_compile_step, rows, args.out_dir, args.torch_compile_limit_s)
    else:
        rows.emit(KD, dict(step="torch_compile", skipped="not asked for (--torch-compile)"))
    timed("boundary_bench", boundary_bench_step, rows, size, on_gpu)

    summary = dict(ok=not rows.failures, failures=rows.failures, step_seconds=steps,
                   total_s=round(time.perf_counter() - began, 2))
    rows.emit(SUMMARY, summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
