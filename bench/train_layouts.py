"""The KD calls and kernels that training and evaluation launch, recorded on this device, then every
(dtype, memory layout) pair of student and teacher logits among them checked against float64.

    python -m bench.train_layouts --data DIR --work DIR --size 32 512 --shape 8 2 256 512 --out layouts.jsonl

1. record: one step of a teacher, of a refiner, of every KD student of the paper's plan (each
   weight and pseudo-label source) at both precisions, and one evaluation, all at --size on the
   current device, with the arguments of every KD call and every kernel launch written down;
2. check: each distinct KD call (student and teacher dtype and memory order, weight mode and its
   options) again at --shape, by `gpu_check.kd_check`, and a boundary-metrics call as evaluation
   makes it against the CPU path;
3. coverage: the kernel specialisations training launched that no check launched (none where the
   checks cover training; the comparison is per binary, so --shape must have --size's width).
Each row is printed and appended to --out as it comes (`check_rows.Rows`).
"""
import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import torch

import objectives
from bench.check_rows import Rows
from bench.gpu_check import boundary_case, kd_check
from bench.precompile import _spec
from bench.stage_times import student_cell
from kernels.dispatch import Launch
from objectives import OBJECTIVES
from reproduction.plan import Planner
from reproduction.schedule import run_in_slot

PRECISIONS = ("bf16", "fp32")


def memory_order(x: torch.Tensor) -> list:
    """x's dimensions from the outermost in memory to the innermost."""
    return sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))


def laid_out(x: torch.Tensor, order: list, dtype: torch.dtype) -> torch.Tensor:
    """A dense copy of x in `dtype` whose dimensions lie in memory in `order`, outermost first."""
    inverse = [order.index(d) for d in range(x.dim())]
    return torch.empty([x.shape[d] for d in order], dtype=dtype, device=x.device).permute(inverse).copy_(x)


def described(x: torch.Tensor) -> dict:
    order = memory_order(x)
    dense = x.stride(order[-1]) == 1 and all(x.stride(a) == x.stride(b) * x.shape[b] for a, b in zip(order, order[1:]))
    return dict(dtype=str(x.dtype).removeprefix("torch."), order=order, dense=dense)


def kernel_key(launch: Launch) -> str:
    """One compiled binary, near enough: kernel, tensor dtypes, meta-parameters and options."""
    spec = _spec(launch)
    return json.dumps([spec.name, [str(a) for a in spec.args if isinstance(a, torch.dtype)],
                       spec.constexprs, spec.options])


class Recorder:
    """While active: every KD call training makes (its arguments, with the runs that made it) and
    every kernel launched."""

    def __init__(self):
        self.calls, self.kernels, self.run = {}, set(), None
        self.weighted_kd_loss, self.launch_kernel = objectives.weighted_kd_loss, Launch.__call__

    def kd(self, student, teacher, weight="ssim", temperature=1.0, reduction="weighted_mean", window=7, gamma=1.0,
           map_temperature=1.0, backend=None):
        call = dict(student=described(student), teacher=described(teacher),
                    weight=weight if isinstance(weight, str) else "tensor", temperature=temperature,
                    reduction=reduction, window=window, gamma=gamma, map_temperature=map_temperature)
        self.calls.setdefault(json.dumps(call), set()).add(self.run)
        return self.weighted_kd_loss(student, teacher, weight, temperature, reduction, window, gamma, map_temperature,
                                     backend)

    def __enter__(self):
        def launch(kernel_launch):
            self.kernels.add(kernel_key(kernel_launch))
            self.launch_kernel(kernel_launch)
        self.patches = [mock.patch.object(objectives, "weighted_kd_loss", self.kd),
                        mock.patch.object(Launch, "__call__", launch)]
        for patch in self.patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in self.patches:
            patch.stop()


def kd_students(data: Path, work: Path) -> list:
    """(objective, KD weight, pseudo-label source) of each kind of KD student in the paper plan."""
    cells = []
    for run in Planner("paper", data, work).plan():
        cell = student_cell(run.argv) if run.script == "train_student" else None
        if cell and OBJECTIVES[cell[0]].weight is not None and cell not in cells:
            cells.append(cell)
    return cells


def record(data: Path, work: Path, size, device: str) -> Recorder:
    """One step of every stage run that launches a kernel, flagged as the plan flags it, at `size`."""
    common = ["--data", str(data), "--device", device, "--steps", "1", "--val-every", "1", "--width", "4",
              "--batch-size", "2"]
    teacher, refiner = work / "teacher.pt", work / "cyclegan.pt"
    runs = [("teacher bf16", "train_teacher", [*common, "--out", str(teacher), "--size", *map(str, size),
                                               "--labeled-ratio", "0.3", "--precision", "bf16"]),
            ("refiner bf16", "train_cyclegan", [*common, "--out", str(refiner), "--teacher", str(teacher),
                                                "--blocks", "1", "--disc-width", "4", "--disc-layers", "1",
                                                "--precision", "bf16"])]
    sources = {"plain": [], "refined": ["--refiner", str(refiner)], "post-processed": ["--postprocess"]}
    for precision in PRECISIONS:
        for method, weight, source in kd_students(data, work):
            name = f"{method} {weight} {source} {precision}"
            student = work / (name.replace(" ", "-") + ".pt")
            runs.append((f"student {name}", "train_student", [
                *common, "--out", str(student), "--teacher", str(teacher), "--unlabeled-batch-size", "2",
                "--precision", precision, "--method", method, "--weight", weight, *sources[source]]))
    runs.append((f"evaluation of {student.stem}", "evaluate", [
        "--data", str(data), "--device", device, "--ckpt", str(student), "--split", "val", "--out", str(work / "eval"),
        "--no-overlays"]))
    with Recorder() as recorder:
        for i, (recorder.run, script, argv) in enumerate(runs):
            ok, _, last = run_in_slot(script, argv, str(work / f"{i:02d}-{script}.log"))
            if not ok:
                raise RuntimeError(f"{recorder.run}: {last}")
    return recorder


def check_call(call: dict, shape, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(len(json.dumps(call)))
    student = 3 * torch.randn(shape, generator=gen, device=device)
    teacher = student + 2 * torch.randn(shape, generator=gen, device=device)
    dtypes = {side: getattr(torch, call[side]["dtype"]) for side in ("student", "teacher")}
    options = {k: call[k] for k in ("temperature", "window", "gamma", "map_temperature")}
    return kd_check(laid_out(student, call["student"]["order"], dtypes["student"]),
                    laid_out(teacher, call["teacher"]["order"], dtypes["teacher"]), call["weight"], **options)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset root (the phantom)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the recording runs' outputs")
    parser.add_argument("--size", type=int, nargs=2, required=True, help="network input H W of the recording runs")
    parser.add_argument("--shape", type=int, nargs=4, required=True, help="N C H W of the checks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file the rows are appended to")
    args = parser.parse_args(argv)
    rows = Rows(str(args.out.parent))
    file = args.out.name
    args.work.mkdir(parents=True, exist_ok=True)
    recorder = rows.attempt(file, "record", record, args.data, args.work, args.size, args.device)
    if recorder is None:
        return 1
    device = torch.device(args.device)
    rows.emit(file, dict(step="recorded", kd_calls=len(recorder.calls), kernels=len(recorder.kernels)))
    with Recorder() as checks:
        for key, runs in recorder.calls.items():
            call = json.loads(key)
            rows.check(file, "layout", lambda: dict(step="layout", **call, shape=args.shape, runs=sorted(runs),
                                                    **check_call(call, args.shape, device)))
        n, _, h, w = args.shape
        rows.check(file, "boundary", lambda: dict(boundary_case(dict(boundary_check=(n, h, w)), device),
                                                  shape=[n, h, w]))
    missed = sorted(recorder.kernels - checks.kernels)
    rows.emit(file, dict(step="coverage", training_kernels=len(recorder.kernels), checked_kernels=len(checks.kernels),
                         missed=[json.loads(k) for k in missed], ok=not missed))
    if missed:
        rows.failures.append(dict(step="coverage", error=f"{len(missed)} kernel(s) training launches were not checked"))
    return 1 if rows.failures else 0


if __name__ == "__main__":
    sys.exit(main())
