"""Step times of every stage on this device, and the paper profile's wall time predicted from them.

    python -m bench.stage_times --data DIR --work DIR --out step_times.jsonl [--size tiny]

The training runs of seed 0 at the Table 1 ratio of the paper plan (the micro plan at --size tiny)
run as the plan runs them, flags and all, for a few dozen steps; each step's wall time comes from
the run's train.jsonl, and a run's step time is their median after the warm-up steps (where cuDNN's
autotune and the kernels' compiles fall). In order, each part's rows appended as it ends:
1. every run once, cuDNN autotune on (training's default), then the test evaluation of the paper's
   method; the paper plan's predicted wall time from these;
2. the teacher, the refiner and the paper's method with autotune off;
3. the same three twice at once, in two processes on the device; the prediction again, now also
   for two runs at once per device (each stage's step time scaled by what sharing cost it).
A prediction schedules every run of the plan as reproduce.py does (`reproduction.schedule.makespan`):
its steps at the measured step time of its own configuration (a student configuration measured
nowhere takes the slowest student's) plus its measured start-up, an evaluation at the measured
seconds per case.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.check_rows import Rows
from data import SPLIT_KEYS
from engine.records import logs_folder
from engine.state import read_checkpoint
from reproduction.schedule import longest_chains_first, makespan
from reproduction.plan import PAPER_METHOD, PROFILES, Planner, ratio_tag

SIZES = {"full": dict(profile="paper", steps=dict(train_teacher=40, train_cyclegan=20, train_student=25), warmup=5),
         "tiny": dict(profile="micro", steps=dict(train_teacher=3, train_cyclegan=3, train_student=3), warmup=1)}
FILE = "step_times.jsonl"
STAGES = ("train_teacher", "train_cyclegan")


def value(argv: list, flag: str):
    return argv[argv.index(flag) + 1] if flag in argv else None


def with_values(argv: list, values: dict) -> list:
    """`argv` as strings, with the value after each flag of `values` replaced."""
    argv = [str(a) for a in argv]
    for flag, new in values.items():
        argv[argv.index(flag) + 1] = str(new)
    return argv


def student_cell(argv: list) -> tuple:
    """A student run's (objective, KD weight or "-", pseudo-label source); the oracle upper bounds'
    weight is "oracle", their targets "true masks"."""
    argv = [str(a) for a in argv]
    oracle = value(argv, "--oracle")
    source = "refined" if "--refiner" in argv else "post-processed" if "--postprocess" in argv else \
        "true masks" if oracle == "targets" else "plain"
    return value(argv, "--method"), value(argv, "--weight") or ("oracle" if oracle == "weight" else "-"), source


def config(script: str, argv: list) -> str:
    """What a run's step time depends on: its stage, and a student's cell."""
    return " ".join([script, *student_cell(argv)]) if script == "train_student" else script


def seed0_runs(profile: str, data: Path, work: Path) -> list:
    """The runs of seed 0 at the profile's Table 1 ratio, in plan order."""
    prefix = f"seed0/{ratio_tag(PROFILES[profile]['ratio'])}/"
    return [r for r in Planner(profile, data, work).plan() if r.name.startswith(prefix)]


def call(run, steps: int, device: str, folder: Path | None = None) -> list:
    """[name, script, argv, log] of `run` for `bench.run_stages`: cut to `steps` and validated only
    at the end (an evaluation as it is), on `device`, writing its output into `folder` (by default
    its own; the name then says which folder)."""
    out = Path(folder or run.output.parent) / run.output.name
    out.parent.mkdir(parents=True, exist_ok=True)
    values = {"--out": out} if run.script == "evaluate" else {"--out": out, "--steps": steps, "--val-every": steps}
    argv = with_values(run.argv, values) + ["--device", device]
    return [run.name if folder is None else f"{folder.name}/{run.name}", run.script, argv,
            str(out.with_name(out.name + ".log"))]


def run_all(groups: list, folder: Path, autotune: bool = True) -> dict:
    """Each group of calls in a process of its own, the groups at once; {name: run_stages' line}."""
    processes = []
    for i, calls in enumerate(groups):
        path = folder / f"calls-{'on' if autotune else 'off'}-{i}.json"
        path.write_text(json.dumps(calls))
        command = [sys.executable, "-m", "bench.run_stages", str(path)] + ([] if autotune else ["--no-cudnn-autotune"])
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    ended = {}
    for process in processes:
        for line in process.communicate()[0].splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                ended[entry["name"]] = entry
    return ended


def step_row(stage_call: list, ended: dict, warmup: int, **kind) -> dict:
    """A training run's step times (median, 10th and 90th percentile after `warmup` steps) and its
    start-up: its wall time less its steps (data, networks, validation, checkpoint; imports aside)."""
    name, script, argv, _ = stage_call
    outcome = ended.get(name)
    row = dict(step="stage", name=name, config=config(script, argv), **kind, ok=bool(outcome and outcome["ok"]))
    if not row["ok"]:
        return dict(row, error=outcome["last"] if outcome else "not run")
    log = logs_folder(Path(value(argv, "--out"))) / "train.jsonl"
    times = [e["time"]["step_s"] for e in map(json.loads, log.read_text().splitlines()) if "time" in e]
    timed = times[warmup:]
    deciles = statistics.quantiles(timed, n=10, method="inclusive")
    return dict(row, steps=len(times), timed_steps=len(timed), median_step_s=statistics.median(timed),
                p10_step_s=deciles[0], p90_step_s=deciles[-1], startup_s=outcome["seconds"] - sum(times))


def cost_model(stage_rows: list, seconds_per_case: float, cases: dict, factors: dict):
    """cost(run) in seconds from the measured rows; `factors`: each stage's step time when sharing
    the device over its time alone (1 where not given)."""
    measured = {r["config"]: r for r in stage_rows if r["ok"]}
    students = [r for r in measured.values() if r["config"].startswith("train_student")]
    slowest = max(students, key=lambda r: r["median_step_s"], default=None)

    def cost(run) -> float:
        if run.script == "evaluate":
            return seconds_per_case * cases[value([str(a) for a in run.argv], "--split")]
        row = measured.get(config(run.script, run.argv)) or (slowest if run.script == "train_student" else None)
        if row is None:
            raise KeyError(f"no step time of {run.script} was measured")
        return row["startup_s"] + run.steps * row["median_step_s"] * factors.get(run.script, 1.0)
    return cost


def prediction(stage_rows: list, eval_row: dict, cases: dict, factors: dict, data: Path, work: Path) -> dict:
    """The paper plan's device time and its wall time on 1 and 8 GPUs, one run at a time on each and,
    with `factors`, two."""
    runs = Planner("paper", data, work).plan()
    per_case = eval_row["seconds"] / eval_row["cases"]
    alone = cost_model(stage_rows, per_case, cases, {})
    ordered = longest_chains_first(runs, "paper", alone)
    wall = {f"{g} GPU{'s' * (g > 1)}, 1 at once": makespan(ordered, "paper", g, alone) for g in (1, 8)}
    if factors:
        shared = cost_model(stage_rows, per_case, cases, factors)
        wall.update({f"{g} GPU{'s' * (g > 1)}, 2 at once": makespan(ordered, "paper", 2 * g, shared)
                     for g in (1, 8)})
    planned = {config(r.script, r.argv) for r in runs if r.script != "evaluate"}
    return dict(step="paper_prediction", runs=len(runs), device_s=round(sum(map(alone, runs))),
                wall_s={k: round(v) for k, v in wall.items()}, sharing_factors=factors,
                unmeasured_configs=sorted(planned - {r["config"] for r in stage_rows if r["ok"]}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset root (the phantom)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the runs' outputs")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file the rows are appended to")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="tiny: the micro plan, for the test")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    size, rows, file = SIZES[args.size], Rows(str(args.out.parent)), args.out.name
    args.work.mkdir(parents=True, exist_ok=True)
    runs = seed0_runs(size["profile"], args.data, args.work)
    training = [r for r in runs if r.script != "evaluate"]
    paper_method = next(r for r in runs if r.script == "evaluate" and r.cells[0] == ("table1", PAPER_METHOD))
    compared = [r for r in training if r.script in STAGES or r.name == paper_method.needs[0]]

    def emit_steps(calls, ended, **kind):
        return [rows.emit(file, step_row(c, ended, size["warmup"], **kind)) for c in calls]

    def predict(*measured):
        row = rows.attempt(file, "paper_prediction", prediction, *measured, args.data, args.work)
        if row:
            rows.emit(file, row)

    # 1. every run alone, autotune on; the test evaluation; the prediction
    calls = [call(r, size["steps"][r.script], args.device) for r in training]
    evaluation = call(paper_method, 0, args.device)
    ended = run_all([calls + [evaluation]], args.work)
    alone = emit_steps(calls, ended, autotune=True, at_once=1)
    split = read_checkpoint(training[0].output, "--teacher")["split"]
    cases = {k: len(split[k]) for k in SPLIT_KEYS}
    outcome = ended.get(evaluation[0], dict(ok=False, seconds=0.0, last="not run"))
    eval_row = rows.emit(file, dict(step="evaluate", name=evaluation[0], split="test", cases=cases["test"],
                                    seconds=outcome["seconds"], ok=outcome["ok"]))
    predict(alone, eval_row, cases, {})

    # 2. autotune off
    off = [call(r, size["steps"][r.script], args.device, args.work / "autotune-off") for r in compared]
    emit_steps(off, run_all([off], args.work, autotune=False), autotune=False, at_once=1)

    # 3. two at once
    pairs = [[call(r, size["steps"][r.script], args.device, args.work / f"shared-{k}") for r in compared]
             for k in (0, 1)]
    ended = run_all(pairs, args.work)
    shared = [row for calls in pairs for row in emit_steps(calls, ended, autotune=True, at_once=2)]
    by_config = {r["config"]: r for r in alone if r["ok"]}
    factors = {}
    for script in (*STAGES, "train_student"):
        times = [r["median_step_s"] / by_config[r["config"]]["median_step_s"] for r in shared
                 if r["ok"] and r["config"].startswith(script) and r["config"] in by_config]
        if times:
            factors[script] = round(statistics.mean(times), 3)
    predict(alone, eval_row, cases, factors)
    return 0 if all(r["ok"] for r in alone + shared) else 1


if __name__ == "__main__":
    sys.exit(main())
