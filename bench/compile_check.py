"""Compile every KD kernel configuration the dispatch can choose, ahead of time, for sm_90 and
sm_80, without a GPU; write registers, spills, shared memory, occupancy and modelled traffic.

    python -m bench.compile_check --out bench/kernels_sm90.json [--arch 90 80] [--quick]

`kd_triton.plan` is asked for the launch of each (kernel, classes, window, phase, weight mode,
dtype, layout) at the benchmark shape, on meta tensors, and `boundary_triton` for its three; the argument types and specialisations
(unit values, 16-divisibility) come from Triton's own `native_specialize_impl`, as a real launch
would get them. `triton.compile` then lowers the kernel for the target, and the bundled ptxas
reports registers, spill bytes and stack (Triton's own ptxas run, its log captured). Needs no
CUDA driver; TRITON_INTERPRET must be unset, or the kernels would be interpreter functions.
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import native_specialize_impl

from engine.records import write_text
from kernels import boundary_triton, kd_triton
from kernels.kd_loss import SSIM_MAX_WINDOW
from .kd_traffic import kd_traffic
from .sass_count import per_pixel

BENCH_SHAPE = (16, 2, 512, 1024)
BOUNDARY_SHAPE = (32, 1024, 2048)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# Per SM: registers, shared memory for CTAs, warps, CTAs (CUDA occupancy tables).
SM_LIMITS = {90: dict(regs=65536, smem=233472, warps=64, ctas=32),
             80: dict(regs=65536, smem=167936, warps=64, ctas=32)}
SMEM_RESERVED_PER_CTA = 1024
MIN_CTAS_PER_SM = 2
_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_available() -> bool:
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        return os.path.exists(get_ptxas(90).path)
    except Exception:  # a triton without the NVIDIA backend's binaries
        return False


def configurations(quick=False):
    """(name, Launch, modelled traffic) for every choice the dispatch can make.

    Classes 2..8 fall into padded sizes 2, 4, 8 (C itself is a runtime value); each window is a
    binary of its own (the radius is a constexpr); duplicates are dropped by the caller. `quick` keeps the extremes: C = 2 and 8, float32 and bfloat16, windows 3 and 15.
    """
    classes = (2, 8) if quick else (2, 4, 8)
    dtypes = ("float32", "bfloat16") if quick else tuple(DTYPES)
    windows = (3, 15) if quick else tuple(range(1, SSIM_MAX_WINDOW + 1, 2))
    pixel = [("none", "loss", 1.0), ("none", "grad", 1.0), ("tensor", "loss", 1.0), ("tensor", "grad", 1.0),
             ("agree", "weight_map", 1.0)] + [("agree", phase, t) for phase in ("loss", "grad") for t in (1.0, 2.0)]
    for c in classes:
        for dtype in dtypes:
            for layout in LAYOUTS:
                n, _, h, w = BENCH_SHAPE
                student = torch.empty((n, c, h, w), dtype=DTYPES[dtype], device="meta",
                                      memory_format=LAYOUTS[layout])
                weight = torch.empty((n, h, w), device="meta")
                for mode, phase, t in pixel:
                    out = _out(student, phase)
                    yield (f"pixel/{mode}/{phase}/t={t:g}/C={c}/{dtype}/{layout}",
                           kd_triton.plan(student, student, phase, mode, weight=weight if mode == "tensor" else None,
                                          out=out, scale=weight, temperature=t),
                           kd_traffic(student.shape, student.element_size(), mode))
                for window in windows:
                    for phase in kd_triton.SSIM_PHASES:
                        yield (f"ssim/{phase}/window={window}/C={c}/{dtype}/{layout}",
                               kd_triton.plan(student, student, phase, "ssim", out=_out(student, phase),
                                              scale=weight, window=window),
                               kd_traffic(student.shape, student.element_size(), "ssim", window))
    yield from boundary_configurations()


def boundary_configurations():
    """The three boundary-metric launches of a benchmark batch (32 cases of 1024 x 2048)."""
    batch, h, w = BOUNDARY_SHAPE
    masks = torch.empty((2 * batch, h, w), dtype=torch.bool, device="meta")
    blocks = triton.cdiv(h * w, boundary_triton.BLOCK_PIXELS)
    capacity = min(h * w, boundary_triton.MAX_POINTS_PER_MASK)
    table = torch.empty((2 * batch, blocks), dtype=torch.int32, device="meta")
    points = torch.empty((2 * batch, capacity), dtype=torch.int32, device="meta")
    counts = torch.empty(2 * batch, dtype=torch.int32, device="meta")
    squared = torch.empty((2 * batch, capacity), device="meta")
    yield "boundary/count", boundary_triton.count_launch(masks, table, blocks), None
    yield "boundary/compact", boundary_triton.compact_launch(masks, table, points, blocks), None
    yield "boundary/nearest", boundary_triton.nearest_launch(points, counts, counts[:batch], squared, w, (0.1, 0.1)), None


def _out(student, phase):
    if phase == "grad":
        return torch.empty_like(student)
    if phase in ("weight_map", "loss_and_weight"):
        n, _, h, w = student.shape
        return torch.empty((n, h, w), device="meta")
    return None


def source(launch, backend):
    """ASTSource with the signature and attributes a launch with these arguments gets."""
    fn = launch.kernel
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        kind, spec = native_specialize_impl(type(backend), launch.args[i], False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec == "D":
            attrs[(i,)] = backend.parse_attr(spec)
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def occupancy(regs, shared, warps, arch):
    """Resident CTAs per SM as the hardware allots them (registers per warp in units of 256)."""
    limits = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = limits["regs"] // regs_per_warp // warps
    by_smem = limits["smem"] // (shared + SMEM_RESERVED_PER_CTA)
    return min(by_regs, by_smem, limits["warps"] // warps, limits["ctas"])


@contextlib.contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def compile_one(launch, arch):
    """Registers, spills, stack, shared memory and occupancy of one launch compiled for `arch`."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    log = io.StringIO()
    # a fresh cache, so that ptxas runs (and reports) even for a binary compiled before
    with tempfile.TemporaryDirectory(prefix="kd-compile-check-") as cache, _environ(
            TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1"), contextlib.redirect_stdout(log):
        compiled = triton.compile(source(launch, backend), target=target, options=launch.options)
    text = log.getvalue()
    spills = _PTXAS_LINE.search(text)
    regs = _REGS.search(text)
    if not (spills and regs):
        raise RuntimeError(f"no ptxas report in the compile log:\n{text}")
    stack, spill_stores, spill_loads = map(int, spills.groups())
    shared = compiled.metadata.shared
    return dict(registers=int(regs.group(1)), spill_store_bytes=spill_stores, spill_load_bytes=spill_loads,
                stack_bytes=stack, shared_bytes=shared, warps=launch.options["num_warps"],
                ctas_per_sm=occupancy(int(regs.group(1)), shared, launch.options["num_warps"], arch),
                **instruction_counts(launch, compiled.asm["cubin"]))


def instruction_counts(launch, cubin):
    """SASS instructions, and a pixel where the kernel has pixels (`sass_count.per_pixel`)."""
    meta = launch.constexprs
    if "ROWS" in meta:
        return per_pixel(cubin, pixels_per_thread=meta["ROWS"] * meta["COLS"] / (launch.options["num_warps"] * 32))
    if "RING" in meta:
        return per_pixel(cubin, window=2 * meta["R"] + 1)
    return per_pixel(cubin)


def run(archs, quick=False, match=None):
    """Compile every distinct configuration (those whose name `match` searches) for each arch;
    a list of result rows."""
    rows, seen = [], {}
    for name, launch, traffic in configurations(quick):
        if match and not re.search(match, name):
            continue
        for arch in archs:
            key = (arch, source(launch, make_backend(GPUTarget("cuda", arch, 32))).hash(), str(launch.options))
            if key not in seen:
                start = time.perf_counter()
                seen[key] = compile_one(launch, arch)
                seen[key]["compile_s"] = round(time.perf_counter() - start, 2)
                print(f"sm_{arch} {name}: {seen[key]['registers']} registers, "
                      f"{seen[key]['spill_store_bytes']}/{seen[key]['spill_load_bytes']} B spilled, "
                      f"{seen[key].get('instructions_per_pixel')} instructions a pixel", file=sys.stderr)
            rows.append(dict(config=name, arch=f"sm_{arch}", **seen[key], modelled_traffic=traffic))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write, e.g. bench/kernels_sm90.json")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SM_LIMITS))
    parser.add_argument("--quick", action="store_true", help="only the extreme configurations")
    parser.add_argument("--match", help="only configurations whose name this regular expression searches")
    parser.add_argument("--before", help="an earlier report: its instructions a pixel go beside this one's, by name")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels it would compile")
    if not ptxas_available():
        raise SystemExit("this triton has no bundled ptxas: nothing to compile with")
    rows = run(args.arch, args.quick, args.match)
    if args.before:
        with open(args.before) as f:
            before = {(r["config"], r["arch"]): r for r in json.load(f)["configurations"]}
        for row in rows:
            if (row["config"], row["arch"]) in before and "instructions_per_pixel" in before[row["config"], row["arch"]]:
                row["instructions_per_pixel_before"] = before[row["config"], row["arch"]]["instructions_per_pixel"]
    worst = {f"sm_{a}": dict(max_registers=max(r["registers"] for r in rows if r["arch"] == f"sm_{a}"),
                             max_spill_bytes=max(r["spill_store_bytes"] + r["spill_load_bytes"]
                                                 for r in rows if r["arch"] == f"sm_{a}"),
                             min_ctas_per_sm=min(r["ctas_per_sm"] for r in rows if r["arch"] == f"sm_{a}"))
             for a in args.arch}
    report = dict(triton=triton.__version__, torch=torch.__version__, shape=list(BENCH_SHAPE),
                  min_ctas_per_sm_required=MIN_CTAS_PER_SM, summary=worst, configurations=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text(args.out, json.dumps(report, indent=1))
    print(json.dumps(worst, indent=1))
    print(f"wrote {args.out}: {len(rows)} configurations")


if __name__ == "__main__":
    main()
