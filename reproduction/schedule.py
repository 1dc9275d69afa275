"""Running the plan: each run in a worker process pinned to one device slot, in dependency order;
a run's arguments, log and state on disk.

A slot is one device (`cpu`, `cuda:0`, ...) with room for one run; a device named K times holds K
runs at once. Each slot is a process of its own (the operating system's processes, nothing
home-made), started once, so torch is imported once per slot rather than once per run; after a
failed run on a GPU the slot gets a fresh process, since a CUDA error can leave the process's
context unusable for every later run (a failed CPU run leaves nothing behind, and its process is
kept). Every run in a slot uses the same number of CPU threads, whatever else runs, so a result
never depends on how many runs shared the machine. A run whose inputs failed is not started; the
others go on.

The cost model: a run costs its stage's start-up plus its steps times the stage's seconds per step
(SECONDS; a student with no unlabelled term, `supervised`, half). Runs start longest chains first (a
run, then the runs that need it, transitively), so that the work that would end last starts
first; the order changes no run's numbers, each run being deterministic on its own.
"""
import contextlib
import importlib
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from engine.cli import check_device
from engine.state import read_checkpoint
from errors import UserError
from objectives import OBJECTIVES


# Estimated (start-up seconds, seconds per step) of each stage run: measured on a 2-core CPU for
# the quick profile, from FLOP counts for the GPU profiles until a GPU run replaces them
# (bench/README.md, "The cost model"; the claims profile's steps are a quarter of the paper's pixels).
SECONDS = {"micro": dict(train_teacher=(1.0, 0.02), train_cyclegan=(1.0, 0.05), train_student=(1.0, 0.04),
                         evaluate=(1.0, 0.0)),
           "quick": dict(train_teacher=(4.0, 0.031), train_cyclegan=(4.0, 0.127), train_student=(4.0, 0.072),
                         evaluate=(1.8, 0.0)),
           "claims": dict(train_teacher=(5.0, 0.0034), train_cyclegan=(5.0, 0.016), train_student=(5.0, 0.0085),
                          evaluate=(10.0, 0.0)),
           "paper": dict(train_teacher=(0.0, 0.0134), train_cyclegan=(0.0, 0.064), train_student=(0.0, 0.034),
                         evaluate=(30.0, 0.0))}


def estimate(run, profile: str) -> float:
    start, step = SECONDS[profile][run.script]
    if run.script == "train_student" and OBJECTIVES[run.argv[run.argv.index("--method") + 1]].target is None:
        step /= 2
    return start + step * run.steps


def longest_chains_first(runs: list, profile: str, cost=None) -> list:
    """The runs ordered by the estimated work of the longest chain each one starts (itself, then the
    runs that need it, transitively), longest first. A run still comes before every run that needs
    it: its chain is longer. `cost(run)`: its seconds, by default `estimate`'s."""
    cost = cost or (lambda run: estimate(run, profile))
    needed_by: dict = {r.name: [] for r in runs}
    for run in runs:
        for name in run.needs:
            needed_by[name].append(run.name)
    chain: dict = {}
    for run in reversed(runs):      # dependency order reversed: a run's dependants are done already
        chain[run.name] = cost(run) + max((chain[n] for n in needed_by[run.name]), default=0.0)
    return sorted(runs, key=lambda r: -chain[r.name])


def makespan(runs: list, profile: str, slots: int, cost=None) -> float:
    """Estimated wall time of the plan on `slots` devices, scheduled as reproduce.py schedules it:
    whenever a device is free it takes the first run, in the given order, whose inputs are done.
    `cost(run)`: its seconds, by default `estimate`'s."""
    cost = cost or (lambda run: estimate(run, profile))
    ended, pending, running, now = {}, list(runs), [], 0.0
    while pending or running:
        for run in [r for r in pending if all(n in ended for n in r.needs)]:
            if len(running) == slots:
                break
            pending.remove(run)
            running.append((now + cost(run), run.name))
        running.sort()
        now, name = running.pop(0)
        ended[name] = now
    return now


def parse_devices(text: str, flag: str = "--devices") -> list[str]:
    """The devices of a comma-separated list; auto: every GPU, or one CPU slot per core without one."""
    if text == "auto":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"] * len(os.sched_getaffinity(0))
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for d in devices:
        check_device(d, f"{flag} {text}", auto=False)
    if not devices:
        raise UserError(f"{flag}: name at least one device")
    return devices


def finished(run) -> bool:
    """Whether a planned run's output is there and complete: an evaluation's summary, a training
    run's checkpoint that says it ran to its end."""
    if run.script == "evaluate":
        return (run.output / "summary.json").is_file()
    return run.output.is_file() and bool(read_checkpoint(run.output, "--out").get("finished"))


def stage_argv(run, device: str) -> list[str]:
    """The run's arguments for `device`; an unfinished training run resumes, an evaluation replaces
    what an earlier one left."""
    argv = [str(a) for a in run.argv] + ["--device", device]
    if run.output.exists():
        argv.append("--overwrite" if run.script == "evaluate" else "--resume")
    return argv


def discard(run) -> None:
    """Delete what a planned run wrote, so that it runs again from its start."""
    if run.output.is_dir():
        shutil.rmtree(run.output)
    else:
        run.output.unlink(missing_ok=True)


def log_file(run) -> Path:
    """The console log of a planned run, beside its output."""
    return run.output.with_name(run.output.name + ".log")


def clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if seconds >= 3600 else \
        f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _start_slot(threads: int) -> None:
    torch.set_num_threads(threads)


def run_in_slot(script: str, argv: list, log: str) -> tuple[bool, float, str]:
    """Call one stage script's main() with its console output in `log`: (ok, seconds, last line)."""
    start = time.perf_counter()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            importlib.import_module(script).main(argv)
            ok = True
        except SystemExit as stop:
            ok = not stop.code
        except Exception as err:   # a failure of one run is reported; the others go on
            print(f"error: {type(err).__name__}: {err}")
            ok = False
    lines = Path(log).read_text(errors="replace").strip().splitlines()
    return ok, time.perf_counter() - start, lines[-1] if lines else ""


def slots_of(devices: list[str], jobs_per_device: int) -> list[str]:
    return [d for d in devices for _ in range(jobs_per_device)]


def _pool(threads: int) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("spawn")   # fork after torch has started threads can hang
    return ProcessPoolExecutor(1, mp_context=context, initializer=_start_slot, initargs=(threads,))


def execute(runs: list, finished: set, slots: list[str], threads: int, argv_of, log_of, on_start,
            on_finish) -> dict:
    """Run `runs` (dependency-ordered, each with `.name` and `.needs`) on `slots`; the runs named in
    `finished` are done already.

    argv_of(run, device) gives the stage's arguments, log_of(run) its log file; on_start(run,
    device) and on_finish(run, ok, seconds, last line) report progress. Returns {name: status}
    with status "done", "failed" or "skipped" (an input failed).
    """
    pools = [_pool(threads) for _ in slots]
    status: dict = {name: "done" for name in finished}
    pending = list(runs)
    busy: dict = {}             # future -> (run, slot index)
    try:
        while pending or busy:
            free = [i for i in range(len(slots)) if i not in {slot for _, slot in busy.values()}]
            for run in list(pending):
                if any(status.get(n) in ("failed", "skipped") for n in run.needs):
                    status[run.name] = "skipped"
                    pending.remove(run)
                    on_finish(run, False, 0.0, "skipped: an input run failed")
                elif free and all(status.get(n) == "done" for n in run.needs):
                    slot = free.pop(0)
                    pending.remove(run)
                    on_start(run, slots[slot])
                    future = pools[slot].submit(run_in_slot, run.script, argv_of(run, slots[slot]), str(log_of(run)))
                    busy[future] = (run, slot)
            if not busy:
                if pending:
                    raise RuntimeError(f"runs wait for inputs outside the plan: {[r.name for r in pending]}")
                continue
            ended, _ = wait(busy, return_when=FIRST_COMPLETED)
            for future in ended:
                run, slot = busy.pop(future)
                try:
                    ok, seconds, last = future.result()
                    fresh = not ok and slots[slot].startswith("cuda")
                except BrokenProcessPool:      # the worker died (out of memory, a crash)
                    ok, seconds, last, fresh = False, 0.0, "its worker process died", True
                if fresh:
                    pools[slot].shutdown(wait=False)
                    pools[slot] = _pool(threads)
                status[run.name] = "done" if ok else "failed"
                on_finish(run, ok, seconds, last)
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
    return status
