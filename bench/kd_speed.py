"""Benchmark of the weighted KD loss, forward + backward (SPEC section 8); a script, never a test.

    python -m bench.kd_speed --out bench/kd_<device>.json
    python -m bench.kd_speed --impls compile --rows DIR/kd_bench.jsonl   # rows as they come

On CUDA, at (16, 2, 512, 1024) in float32 and bfloat16 and for every weight mode, it first
checks the Triton path against the float64 reference, then times the Triton kernels, the eager
torch reference and `torch.compile` of that reference, each computing the loss and the student
gradient (`torch.autograd.grad`, so no `.grad` accumulation is timed). A device-to-device copy
of the same number of bytes gives the bandwidth ceiling. Each row records the modelled bytes of
the Triton kernels (`kd_traffic.py`: 5 units of a logit tensor per step, plus ssim halos) and
the one-pass minimum (3 units), with the fraction of copy bandwidth against each. Without CUDA
it times the two torch paths at (2, 2, 128, 256) and the JSON says so: the Triton interpreter is
a test vehicle, not a timing.
"""
import argparse
import json
import os
import statistics
import time

import torch
import triton

from bench.check_rows import Rows, machine
from bench.kd_traffic import kd_traffic
from engine.records import cpu_model, write_text
from kernels.kd_loss import kd_loss_reference, weight_map_reference, weighted_kd_loss

GPU_SHAPE = (16, 2, 512, 1024)
CPU_SHAPE = (2, 2, 128, 256)
CHECK_SHAPE = (2, 2, 200, 328)  # the correctness check: odd-sized tiles at the borders
MODES = ("none", "agree", "ssim")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
L2_FLUSH_BYTES = 256 << 20


def fresh_logits(shape, dtype, device, seed):
    """Student and teacher logits with a realistic spread (never zeros, never a reused tensor)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    student = 3 * torch.randn(shape, generator=gen, device=device)
    teacher = student + 2 * torch.randn(shape, generator=gen, device=device)
    return student.to(dtype).requires_grad_(), teacher.to(dtype)


def reference_loss(student, teacher, mode):
    return kd_loss_reference(student, teacher, weight_map_reference(student, teacher, mode))


def time_ms(fn, device, warmup, reps):
    """Median and spread (10th, 90th percentile) of `reps` timed calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            flush.zero_()  # every rep starts from a cold L2, as in training
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    deciles = statistics.quantiles(times, n=10)
    return {"median_ms": statistics.median(times), "p10_ms": deciles[0], "p90_ms": deciles[-1],
            "reps": reps}


def check_triton(device):
    """Max relative errors of the Triton loss and gradient against the float64 reference."""
    errors = {}
    for dtype_name, dtype in DTYPES.items():
        for mode in MODES:
            student, teacher = fresh_logits(CHECK_SHAPE, dtype, device, seed=1)
            loss = weighted_kd_loss(student, teacher, weight=mode)
            grad, = torch.autograd.grad(loss, student)
            s64 = student.detach().double().requires_grad_()
            ref = reference_loss(s64, teacher.double(), mode)
            ref_grad, = torch.autograd.grad(ref, s64)
            loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
            grad_err = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
            limit = 1e-4 if dtype == torch.float32 else 1e-2
            if not (loss_err < 1e-4 and grad_err < limit):
                raise AssertionError(f"Triton {dtype_name} {mode}: loss error {loss_err:.2e}, "
                                 f"gradient error {grad_err:.2e} against the float64 reference")
            errors[f"{dtype_name}/{mode}"] = {"loss_rel_err": loss_err, "grad_rel_err": grad_err}
    return errors


def copy_bandwidth(device, nbytes, warmup, reps):
    """GB/s of a device-to-device copy moving `nbytes` in total (half read, half written)."""
    src = torch.randint(0, 255, (nbytes // 2,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), device, warmup, reps)
    return {**timing, "bytes": nbytes, "GB_per_s": nbytes / timing["median_ms"] / 1e6}


def implementations(device, mode, names):
    """Name -> loss function of the implementations asked for: triton, eager, compile."""
    table = {"triton": lambda s, t: weighted_kd_loss(s, t, weight=mode),
             "eager": lambda s, t: reference_loss(s, t, mode)}
    if "compile" in names:
        table["compile"] = torch.compile(lambda s, t: reference_loss(s, t, mode))
    return {name: table[name] for name in names}


def timing_row(device, shape, dtype_name, mode, names, warmup, reps, seed, copy=None):
    """One row: forward + backward times of each implementation in `names`, with the modelled
    bytes and the bandwidth they imply (against the copy's, where `copy` was measured)."""
    dtype = DTYPES[dtype_name]
    student, teacher = fresh_logits(shape, dtype, device, seed=seed)
    traffic = kd_traffic(shape, dtype.itemsize, mode)
    row = {"dtype": dtype_name, "mode": mode, "shape": list(shape), "modelled_step_bytes": traffic["step_bytes"],
           "min_step_bytes": traffic["step_min_bytes"]}
    for name, loss_fn in implementations(device, mode, names).items():
        step = lambda: torch.autograd.grad(loss_fn(student, teacher), student)  # noqa: E731
        row[name] = time_ms(step, device, warmup, reps)
        seconds = row[name]["median_ms"] * 1e-3
        row[name]["GB_per_s_at_min_bytes"] = traffic["step_min_bytes"] / seconds / 1e9
        if copy:
            row[name]["fraction_of_copy_at_min_bytes"] = row[name]["GB_per_s_at_min_bytes"] / copy["GB_per_s"]
            if name == "triton":  # the bytes the kernels are modelled to move
                row[name]["fraction_of_copy_at_modelled_bytes"] = (
                    traffic["step_bytes"] / seconds / 1e9 / copy["GB_per_s"])
    for base in ("eager", "compile"):
        if "triton" in row and base in row:
            row[f"speedup_vs_{base}"] = row[base]["median_ms"] / row["triton"]["median_ms"]
    if "triton" not in row and {"eager", "compile"} <= set(row):
        row["compile_speedup_vs_eager"] = row["eager"]["median_ms"] / row["compile"]["median_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file to write, e.g. bench/kd_h100.json")
    parser.add_argument("--rows", help="instead: append each row to this JSON-lines file as it is measured")
    parser.add_argument("--impls", nargs="+", choices=("triton", "eager", "compile"),
                        help="implementations to time (default: triton where CUDA is, eager, compile)")
    parser.add_argument("--reps", type=int, default=50, help="timed repeats per measurement")
    args = parser.parse_args()
    if not (args.out or args.rows):
        parser.error("give --out or --rows")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    warmup = 10 if on_gpu else 2
    reps = args.reps if on_gpu else min(args.reps, 10)
    names = args.impls or (["triton"] if on_gpu else []) + ["eager", "compile"]
    report = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu: {cpu_model()}",
        "torch": torch.__version__, "triton": triton.__version__, "shape": list(shape), **machine(),
        "measure": "loss + student gradient (torch.autograd.grad), weight_map included",
    }
    if on_gpu and "triton" in names:
        report["correctness"] = check_triton(device)
    elif not on_gpu:
        report["note"] = (f"no CUDA device: CPU paths only (eager and torch.compile of the reference) "
                          f"at {CPU_SHAPE} instead of {GPU_SHAPE}; no Triton timing, no bandwidth ceiling")
    rows = Rows(os.path.dirname(os.path.abspath(args.rows))) if args.rows else None
    numel = 1
    for size in shape:
        numel *= size
    results = []
    for dtype_name, dtype in DTYPES.items():
        copy = copy_bandwidth(device, 3 * numel * dtype.itemsize, warmup, reps) if on_gpu else None
        if copy:
            report[f"copy_{dtype_name}"] = copy
        for mode in MODES:
            row = timing_row(device, shape, dtype_name, mode, names, warmup, reps, len(results), copy)
            results.append(row)
            if rows:
                rows.emit(os.path.basename(args.rows), row)
            else:
                print(json.dumps(row), flush=True)
    report["results"] = results
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_text(args.out, json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
