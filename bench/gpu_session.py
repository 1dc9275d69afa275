"""One GPU session within a deadline: the kernels checked, the training layouts checked against
float64, a memory check, every stage's step time, then the claims at the paper's widths.

    python3 -m bench.gpu_session --out-dir "$OUT" --minutes 9.5

The phases run in order, each in a process group of its own that is stopped at the phase's cap (a
share of the time left), and each writes its file into --out-dir before the next starts:
- kernels.jsonl: `bench.gpu_check` (every kernel against its reference, then the benchmarks), its
  four files' rows in one, each with the file it belongs to;
- layouts.jsonl: `bench.train_layouts`, every KD call training and evaluation make, recorded on the
  device, checked at (8, 2, 256, 512) against float64, and which kernels the checks left out;
- memcheck.log: `compute-sanitizer --tool memcheck` over `bench.memcheck_target`, or why it did not
  run;
- step_times.jsonl: `bench.stage_times`, every stage's step time at 256x512, width 32, batch 8,
  bf16, with cuDNN autotune on and off, alone and two at once, and the paper profile's predicted
  wall time on one and eight GPUs;
- claims_tables.md, claims_results.json, claims_logs.tar.gz: `reproduce.py --profile claims` on
  this GPU, three runs at once, until the deadline: the tables of the seeds that finished, every
  finished run's per-case numbers, every run's console log and train.jsonl.
session.jsonl opens with the machine and gets one row per phase as it ends (its seconds, its cap,
how it ended, the end of its console output where it did not finish cleanly), then the files.
The phantom the stage runs read is generated in the background from the start. Eight files in all,
each far under the 16 MiB a collected file may have. `--size tiny` runs the same phases at toy
sizes on the CPU through the Triton interpreter (the micro plan in place of the claims profile): the
test of this script.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from bench.check_rows import MAX_FILE_BYTES, machine
from data.phantom import generate
from engine.records import git_hash

SIZES = {
    "full": dict(phantom=dict(), record_size=(32, 512), check_shape=(8, 2, 256, 512), claims="claims", jobs=3,
                 pack_s=15.0),
    "tiny": dict(phantom=dict(n=20, size=(32, 64), seed=4), record_size=(32, 64), check_shape=(2, 2, 32, 64),
                 claims="micro", jobs=2, pack_s=3.0),
}
# each phase's cap as a share of the whole budget; the claims take what is left
SHARES = dict(kernels=0.15, layouts=0.12, memcheck=0.10, step_times=0.25)
SANITIZER = ("compute-sanitizer", "/usr/local/cuda/bin/compute-sanitizer")
KERNEL_FILES = ("check.jsonl", "kd_bench.jsonl", "boundary_bench.jsonl", "summary.jsonl")


class Session:
    """The deadline, the output folder, and the phases' process groups."""

    def __init__(self, out: Path, work: Path, minutes: float, size: str):
        self.out, self.work, self.size = out, work, SIZES[size]
        self.started = time.monotonic()
        self.budget = 60.0 * minutes - self.size["pack_s"]
        self.device = "cpu" if size == "tiny" else "cuda:0"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if size == "tiny":
            self.env["TRITON_INTERPRET"] = "1"
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def log(self, row: dict) -> dict:
        line = json.dumps(row, default=str)
        print(line, flush=True)
        with open(self.out / "session.jsonl", "a") as f:
            f.write(line + "\n")
        return row

    def run(self, phase: str, command: list, cap: float, console: Path) -> dict:
        """`command` in its own process group, stopped (the whole group) at `cap` seconds."""
        cap = max(0.0, min(cap, self.left()))
        start = time.monotonic()
        with open(console, "w") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
            try:
                code, ended = process.wait(timeout=cap), "finished"
            except subprocess.TimeoutExpired:
                stop(process)
                code, ended = None, "stopped at its cap"
        row = dict(phase=phase, ended=ended, exit_code=code, seconds=round(time.monotonic() - start, 1),
                   cap_s=round(cap, 1))
        if code != 0:
            row["console_tail"] = console.read_text(errors="replace")[-1500:]
        return row


def stop(process: subprocess.Popen) -> None:
    """The process's whole group: asked to end, then killed."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def kernels_phase(s: Session, size_name: str) -> dict:
    folder = s.work / "kernels"
    command = [sys.executable, "-m", "bench.gpu_check", "--out-dir", str(folder), "--size", size_name]
    row = s.run("kernels", command, SHARES["kernels"] * s.budget, s.work / "kernels.console")
    with open(s.out / "kernels.jsonl", "w") as merged:
        for name in KERNEL_FILES:
            path = folder / name
            for line in path.read_text().splitlines() if path.is_file() else ():
                merged.write(json.dumps(dict(json.loads(line), file=name)) + "\n")
    return row


def layouts_phase(s: Session, data: Path) -> dict:
    command = [sys.executable, "-m", "bench.train_layouts", "--data", str(data), "--work", str(s.work / "layouts"),
               "--size", *map(str, s.size["record_size"]), "--shape", *map(str, s.size["check_shape"]),
               "--device", s.device, "--out", str(s.out / "layouts.jsonl")]
    (s.out / "layouts.jsonl").touch()
    return s.run("layouts", command, SHARES["layouts"] * s.budget, s.work / "layouts.console")


def memcheck_phase(s: Session) -> dict:
    log = s.out / "memcheck.log"
    tool = next((shutil.which(t) for t in SANITIZER if shutil.which(t)), None)
    reason = ("no CUDA device" if s.device == "cpu" else None) or (None if tool else
                                                                  f"none of {', '.join(SANITIZER)} exists here")
    if reason:
        log.write_text(f"compute-sanitizer memcheck not run: {reason}\n")
        return dict(phase="memcheck", ended="skipped", reason=reason)
    command = [tool, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "40", sys.executable, "-m",
               "bench.memcheck_target"]
    row = s.run("memcheck", command, SHARES["memcheck"] * s.budget, log)
    summary = [line for line in log.read_text(errors="replace").splitlines() if "ERROR SUMMARY" in line]
    return dict(row, error_summary=summary[-1] if summary else None)


def step_times_phase(s: Session, data: Path, size_name: str) -> dict:
    command = [sys.executable, "-m", "bench.stage_times", "--data", str(data), "--work", str(s.work / "steps"),
               "--out", str(s.out / "step_times.jsonl"), "--size", size_name, "--device", s.device]
    (s.out / "step_times.jsonl").touch()
    return s.run("step_times", command, SHARES["step_times"] * s.budget, s.work / "step_times.console")


def claims_phase(s: Session, data: Path) -> dict:
    folder = s.work / "claims"
    command = [sys.executable, "reproduce.py", "--profile", s.size["claims"], "--data", str(data), "--out", str(folder),
               "--devices", s.device, "--jobs-per-device", str(s.size["jobs"])]
    row = s.run("claims", command, s.left(), s.work / "claims.console")
    tables, results = folder / "tables.md", folder / "results.json"
    if tables.is_file():
        shutil.copy(tables, s.out / "claims_tables.md")
    else:
        (s.out / "claims_tables.md").write_text(f"No seed of the {s.size['claims']} profile finished all its table "
                                                 f"runs within the session ({row['seconds']} s).\n")
    if results.is_file():
        shutil.copy(results, s.out / "claims_results.json")
    else:
        (s.out / "claims_results.json").write_text(json.dumps(dict(profile=s.size["claims"], runs={})) + "\n")
    with tarfile.open(s.out / "claims_logs.tar.gz", "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.name.endswith(".log") or path.name == "train.jsonl":
                tar.add(path, arcname=str(path.relative_to(folder)))
    runs = json.loads((s.out / "claims_results.json").read_text())["runs"]
    return dict(row, finished_runs=len(runs), tables="claims_tables.md" if tables.is_file() else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=os.environ.get("OUT"),
                        help="folder for the session's files (default: $OUT)")
    parser.add_argument("--minutes", type=float, default=9.5, help="the whole session's deadline, packing included")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="tiny: toy sizes on the CPU, the test")
    parser.add_argument("--work", type=Path, default=None, help="folder for what is not collected (default: a new "
                                                                 "temporary one)")
    args = parser.parse_args(argv)
    if not args.out_dir:
        parser.error("give --out-dir or set OUT")
    if args.size == "full" and not torch.cuda.is_available():
        parser.error("--size full needs a CUDA device; use --size tiny")
    s = Session(args.out_dir, args.work or Path(tempfile.mkdtemp(prefix="gpu-session-")), args.minutes, args.size)
    s.log(dict(phase="environment", device=torch.cuda.get_device_name() if s.device != "cpu" else "cpu (interpreter)",
               torch=torch.__version__, code=git_hash(), python=sys.version.split()[0], size=args.size,
               minutes=args.minutes, **machine()))
    data = s.work / "data"
    phantom = multiprocessing.get_context("spawn").Process(target=generate, args=(data,), kwargs=s.size["phantom"])
    phantom.start()

    s.log(kernels_phase(s, args.size))
    phantom.join(max(0.0, s.left()))
    if phantom.exitcode != 0:
        s.log(dict(phase="phantom", ended="failed", exit_code=phantom.exitcode))
    s.log(layouts_phase(s, data))
    s.log(memcheck_phase(s))
    s.log(step_times_phase(s, data, args.size))
    s.log(claims_phase(s, data))

    files = sorted(p for p in s.out.rglob("*") if p.is_file())
    s.log(dict(phase="files", files={str(p.relative_to(s.out)): p.stat().st_size for p in files},
               seconds=round(time.monotonic() - s.started, 1),
               ok=len(files) <= 8 and all(p.stat().st_size < MAX_FILE_BYTES for p in files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
