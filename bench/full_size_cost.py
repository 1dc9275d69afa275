"""What evaluation and prediction cost per full-size clinical panorama (2943x1435).

    python -m bench.full_size_cost --work scratch/full_size --out bench/full_size_cpu.json

Writes 16 synthetic full-size cases into --work (8-bit PNG and 16-bit TIFF alternately; 4
labelled, 2 validation, 10 test), trains a small teacher on them, and runs evaluate.py on the 10
test cases and predict.py on their 10 images, each as a user runs it, in a process of its own,
with --batch-size 1 and 8. The time per case is the difference from the same command on 2 cases
(the validation split; a folder of 2 images) divided by 8, which leaves out the start-up; the
peak memory is the process's maximum resident set size (GNU time), start-up included.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from data.synthetic import panorama, write_case
from engine.records import write_text

REPO = Path(__file__).resolve().parent.parent
SIZE = (1435, 2943)
SPLIT = dict(labeled=[f"c{i:02d}" for i in range(4)], unlabeled=[], val=["c04", "c05"],
             test=[f"c{i:02d}" for i in range(6, 16)])


def write_cases(root: Path) -> None:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        write_case(root, f"c{i:02d}", *panorama(rng, SIZE), sixteen_bit=i % 2 == 1)
    (root / "splits.json").write_text(json.dumps(SPLIT))


def timed(script: str, *args) -> dict:
    """Wall seconds and peak resident megabytes of one run of a top-level script."""
    gnu_time = shutil.which("time")     # the program, not the shell's keyword: -v reports the peak memory
    if gnu_time is None:
        raise SystemExit("bench.full_size_cost needs GNU time on the PATH (package `time`)")
    start = time.perf_counter()
    proc = subprocess.run([gnu_time, "-v", sys.executable, str(REPO / script), *map(str, args)],
                          capture_output=True, text=True, env=dict(os.environ), cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed:\n{proc.stderr[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return dict(wall_s=round(wall, 2), peak_mb=round(peak_kb / 1024))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (data, checkpoint, outputs)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--teacher-steps", type=int, default=60)
    args = ap.parse_args()
    data, teacher = args.work / "data", args.work / "teacher.pt"
    if not (data / "splits.json").exists():
        write_cases(data)
    if not teacher.exists():
        subprocess.run([sys.executable, str(REPO / "train_teacher.py"), "--data", str(data), "--out", str(teacher),
                        "--steps", str(args.teacher_steps), "--val-every", str(args.teacher_steps), "--width", "16",
                        "--size", "128", "256"], check=True, cwd=REPO)
    few, many = args.work / "two_images", args.work / "ten_images"
    for folder, ids in ((few, SPLIT["val"]), (many, SPLIT["test"])):
        folder.mkdir(exist_ok=True)
        for case_id in ids:
            source = next((data / "images").glob(f"{case_id}.*"))
            shutil.copy(source, folder / source.name)
    results = {}
    for batch in (1, 8):
        for name, script, two, ten in [
                ("evaluate", "evaluate.py", ["--split", "val"], ["--split", "test"]),
                ("predict", "predict.py", ["--images", few], ["--images", many])]:
            common = ["--ckpt", teacher, "--batch-size", batch, "--out", args.work / f"{name}_out"]
            common += ["--data", data] if name == "evaluate" else []
            runs = [timed(script, *common, *extra) for extra in (two, ten)]
            results[f"{name}, batch {batch}"] = dict(
                per_case_s=round((runs[1]["wall_s"] - runs[0]["wall_s"]) / 8, 2), two_cases=runs[0], ten_cases=runs[1])
            print(f"{name}, batch {batch}: {results[f'{name}, batch {batch}']}", flush=True)
    machine = dict(cpu=platform.processor() or platform.machine(), cores=len(os.sched_getaffinity(0)),
                   load_average=os.getloadavg()[0], threads=os.environ.get("OMP_NUM_THREADS", "all"))
    write_text(args.out, json.dumps(dict(machine=machine, image_size=list(SIZE), network_input=[128, 256],
                                         teacher_width=16, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
