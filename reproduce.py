"""Reproduce the paper's four tables (SPEC section 7) with one command.

    python reproduce.py --profile quick                    # CPU: small size and widths, 7 seeds for the claims
    python reproduce.py --profile paper --devices cuda:0,cuda:1,cuda:2,cuda:3
    python reproduce.py --profile paper --plan-json plan.json   # for a cluster's scheduler
    python reproduce.py --profile paper --run seed0/r0025/teacher.pt

Plans every stage run the tables need, sharing what rows have in common (one teacher per
labelled ratio and seed, one refiner per teacher), and runs them in dependency order, each in a
worker process pinned to one of --devices (several at once when the devices are several or a
device is named more than once, or with --jobs-per-device). Finished runs are reused, so an
interrupted reproduction continues where it stopped (an unfinished training run resumes);
--force redoes everything. A failing run stops the runs that need it; the others go on.

Reads --data (the embedded phantom by default); writes into --out: table1..4 as .md and .csv,
tables.md with all four, results.json with every run's per-case numbers, seed, wall time and
command, and one console log per run beside its output. results.json is rewritten after every
run, the tables each time a seed's table runs have all finished (from the seeds finished so far,
which their caption counts), so a reproduction stopped at any moment leaves valid tables.
"""
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from data import prepare_dataset
from engine.cli import REPO, check_device, parse, setting, writable_dir, writable_file
from engine.records import environment, write_json, write_text
from engine.state import read_checkpoint
from errors import UserError, exit_on_user_error
from objectives import OBJECTIVES
from reproduction.plan import PROFILES, Planner, shown
from reproduction.schedule import execute, run_in_slot, slots_of
from reproduction.figures import draw_figures
from reproduction.tables import CASE_METRICS, collect, render, table_specs
from settings import DEFAULT_DATA

# Estimated (start-up seconds, seconds per step) of each stage run, for the ETA and --plan-json:
# measured on a 2-core CPU for the quick profile, from FLOP counts for the GPU profiles until a
# GPU run replaces them (docs/RESULTS.md, "Costs"; the claims profile's steps are a quarter of the
# paper's pixels).
SECONDS = {"micro": dict(train_teacher=(1.0, 0.02), train_cyclegan=(1.0, 0.05), train_student=(1.0, 0.04),
                         evaluate=(1.0, 0.0)),
           "quick": dict(train_teacher=(4.0, 0.044), train_cyclegan=(6.0, 0.22), train_student=(4.0, 0.11),
                         evaluate=(4.0, 0.0)),
           "claims": dict(train_teacher=(5.0, 0.0034), train_cyclegan=(5.0, 0.016), train_student=(5.0, 0.0085),
                          evaluate=(10.0, 0.0)),
           "paper": dict(train_teacher=(0.0, 0.0134), train_cyclegan=(0.0, 0.064), train_student=(0.0, 0.034),
                         evaluate=(30.0, 0.0))}


@dataclasses.dataclass
class ReproduceSettings:
    profile: str = setting("quick", "quick: CPU minutes; claims: one GPU, minutes, the claims' runs at the paper's "
                                    "widths; paper: GPU, full size, six seeds; micro: a seconds-long check",
                           choices=tuple(PROFILES))
    data: Path = setting(DEFAULT_DATA, "dataset root; the embedded phantom is generated there on first use")
    out: Path | None = setting(None, "output folder; default: results/<profile>")
    seeds: int | None = setting(None, "number of seeds; default: the profile's", within="[1, inf)")
    devices: str = setting("auto", "comma-separated devices to run on, e.g. cuda:0,cuda:1 or cpu,cpu; auto: every "
                                   "GPU, or one CPU slot per core without one")
    jobs_per_device: int = setting(1, "runs at once on each listed device", within="[1, inf)")
    force: bool = setting(False, "redo every run instead of reusing finished ones")
    plan_json: Path | None = setting(None, "write the plan (every run's command, output, inputs and estimated cost) "
                                           "to this file and stop")
    run: str | None = setting(None, "run exactly this run of the plan (by name, see --plan-json), then stop")
    precision: str | None = setting(None, "arithmetic of every run; default: the profile's (quick: fp32, so that "
                                          "every CPU computes alike); another one writes to results/<profile>-<it>",
                                    choices=("fp32", "bf16"))


def parse_devices(text: str) -> list[str]:
    if text == "auto":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"] * len(os.sched_getaffinity(0))
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for d in devices:
        check_device(d, f"--devices {text}", auto=False)
    if not devices:
        raise UserError("--devices: name at least one device")
    return devices


def finished(run) -> bool:
    if run.script == "evaluate":
        return (run.output / "summary.json").is_file()
    return run.output.is_file() and bool(read_checkpoint(run.output, "--out").get("finished"))


def estimate(run, profile: str) -> float:
    start, step = SECONDS[profile][run.script]
    if run.script == "train_student" and OBJECTIVES[run.argv[run.argv.index("--method") + 1]].target is None:
        step /= 2
    return start + step * run.steps


def stage_argv(run, device: str) -> list[str]:
    """The run's arguments for `device`; an unfinished training run resumes, an evaluation replaces
    what an earlier one left."""
    argv = [str(a) for a in run.argv] + ["--device", device]
    if run.output.exists():
        argv.append("--overwrite" if run.script == "evaluate" else "--resume")
    return argv


def log_file(run) -> Path:
    return run.output.with_name(run.output.name + ".log")


def portable(arg, out: Path, data: Path) -> str:
    """A command-line argument with the machine's paths replaced, for the committed results."""
    text = str(arg)
    return text.replace(str(out), "<out>").replace(str(data), "<data>")


def run_record(run, wall: float | None, previous: dict, out: Path, data: Path) -> dict:
    entry = dict(script=run.script, seed=run.seed, steps=run.steps, cells=run.cells, needs=run.needs,
                 argv=[portable(a, out, data) for a in run.argv],
                 wall_s=wall if wall is not None else previous.get("wall_s"))
    if run.script == "evaluate":
        summary = json.loads((run.output / "summary.json").read_text())
        entry["metrics"] = {m: {k: s[k] for k in ("mean", "std", "median", "n", "n_undefined")}
                            for m, s in summary["metrics"].items()}
        with open(run.output / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        entry["cases"] = {"id": [r["id"] for r in rows]}
        per_class = [m for m in (rows[0] if rows else ()) if m.partition("[")[0] in CASE_METRICS and "[" in m]
        entry["cases"].update({m: [None if r[m] == "nan" else float(r[m]) for r in rows]
                               for m in (*CASE_METRICS, *per_class)})
    elif run.script == "train_cyclegan":     # the refiner's validation record: its keep-rule verdict
        entry["keep_rule"] = read_checkpoint(run.output, "--out")["metrics"]
    return entry


def dataset_name(root: Path) -> str:
    """The dataset as the tables name it: the phantom's settings, or a fingerprint of the files."""
    info = root / "phantom.json"
    if info.is_file():
        p = json.loads(info.read_text())
        return f"phantom v{p['format_version']}, {p['n']} cases at {p['size'][0]}x{p['size'][1]}, seed {p['seed']}"
    listing = sorted(f"{f.relative_to(root)}:{f.stat().st_size}" for f in root.rglob("*") if f.is_file())
    return f"{root.name} (fingerprint {hashlib.sha256(chr(10).join(listing).encode()).hexdigest()[:12]})"


def clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if seconds >= 3600 else \
        f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def caption(results: dict) -> str:
    walls: dict = {}
    for run in results["runs"].values():
        walls[run["script"]] = walls.get(run["script"], 0.0) + (run["wall_s"] or 0.0)
    stages = ", ".join(f"{s.replace('train_', '')} {clock(w)}" for s, w in walls.items())
    env = results["environment"]
    wall, calls = results.get("wall_s"), results.get("invocations", 1)
    return (f"Profile `{results['profile']}`, data: {results['data']}, {results['precision']} on {results['device']} "
            f"({env['cpu']}; {len(results['slots'])} runs at once, {results['threads_per_run']} thread(s) each), "
            f"torch {env['torch']}, code {env['git'][:12]}; mean ± std over the n seeds of a row (n for each method, in "
            f"column order, where they differ; over the scored cases where n is 1). Run time summed by stage: {stages}"
            + (f"; wall time of the reproduction {clock(wall)}" + (f" over {calls} invocations" if calls > 1 else "")
               + "." if wall else ".") + partial_note(results.get("seeds_finished")))


def partial_note(seeds_finished) -> str:
    if seeds_finished is None:
        return ""
    seeds, planned = seeds_finished
    return (f" These tables hold the {len(seeds)} of {planned} planned seeds whose table runs had all finished "
            f"(seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}).")


def finished_seeds(runs: list, finished: set) -> list:
    """The seeds all of whose table runs (those that feed a cell) are in `finished`."""
    table_runs = [r for r in runs if r.cells]
    return sorted({r.seed for r in table_runs} - {r.seed for r in table_runs if r.name not in finished})


def write_tables(out: Path, results: dict) -> str:
    cells, text = collect(results), []
    for name, spec in table_specs(PROFILES[results["profile"]]).items():
        md, table_csv = render(name, spec, cells, caption(results))
        write_text(out / f"{name}.md", md)
        write_text(out / f"{name}.csv", table_csv)
        text.append(md)
    write_text(out / "tables.md", "\n".join(text))
    draw_figures(out, cells, table_specs(PROFILES[results["profile"]]), PROFILES[results["profile"]])
    return "\n".join(text)


def longest_chains_first(runs: list, profile: str, cost=None) -> list:
    """The runs ordered by the estimated work of the longest chain each one starts (itself, then the
    runs that need it, transitively), longest first, so that the slots start the work that would
    otherwise finish last. A run still comes before every run that needs it: its chain is longer.
    `cost(run)`: its seconds, by default `estimate`'s."""
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
    """Estimated wall time of the plan on `slots` devices, scheduled as `execute` does: whenever a
    device is free it takes the first run, in the given order, whose inputs are done. `cost(run)`:
    its seconds, by default `estimate`'s."""
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


def write_plan(path: Path, runs: list, profile: str) -> None:
    entries = [dict(name=r.name, command=[sys.executable, str(REPO / f"{r.script}.py"), *map(str, r.argv)],
                    output=str(r.output), needs=r.needs, estimated_seconds=round(estimate(r, profile), 1))
               for r in runs]
    total = sum(e["estimated_seconds"] for e in entries)
    walls = {n: round(makespan(runs, profile, n)) for n in (1, 2, 8)}
    write_json(writable_file(path, "--plan-json"), dict(profile=profile, runs=entries, estimated_seconds=total,
                                                        estimated_wall_seconds_on_devices=walls))
    source = "CPU step times measured here" if profile in ("micro", "quick") else \
        "FLOP counts at an assumed 100 TFLOP/s"
    print(f"{len(runs)} runs written to {path}; estimated from {source}: {clock(total)} of device time, "
          + ", ".join(f"{clock(w)} on {n} device{'s' * (n > 1)}" for n, w in walls.items()))


def run_one(args, runs: list, out: Path) -> None:
    """--run NAME: exactly one run of the plan, in this process."""
    run = next((r for r in runs if r.name == args.run), None)
    if run is None:
        raise UserError(f"--run {args.run}: no such run in the {args.profile} plan (see --plan-json)")
    if finished(run) and not args.force:
        print(f"{run.name}: finished already; nothing to do")
        return
    device = parse_devices(args.devices)[0]
    if device == "cpu":
        torch.set_num_threads(1)            # as every CPU run of a whole reproduction
    ok, seconds, last = run_in_slot(run.script, stage_argv(run, device), str(log_file(run)))
    if not ok:
        raise UserError(f"run {run.name} failed after {seconds:.0f} s: {last} (log: {log_file(run)})")
    print(f"{run.name}: done in {clock(seconds)}")


def previous_results(path: Path, args, done: set) -> dict:
    """The results.json an interrupted reproduction of the same profile and settings left, for the
    runs it finished; a fresh start when there is none, when none of the plan's runs is `done` on
    disk (a fresh clone holds the committed results.json but no outputs; --force has deleted them),
    or when it was made with other settings: its runs and wall time would not belong to these tables."""
    if not done or not path.is_file():
        return {"runs": {}}
    results = json.loads(path.read_text())
    settings = json.loads(json.dumps(PROFILES[args.profile]))    # as stored: tuples become lists
    if results.get("profile") != args.profile or results.get("settings") != settings \
            or results.get("precision") != (args.precision or PROFILES[args.profile]["precision"]):
        return {"runs": {}}
    return results


@exit_on_user_error
def main(argv=None):
    args = parse(ReproduceSettings, __doc__, argv)
    precision = args.precision or PROFILES[args.profile]["precision"]
    default_out = args.profile + ("" if precision == PROFILES[args.profile]["precision"] else f"-{precision}")
    out = (args.out or (REPO / "results" / default_out)).resolve()
    data = prepare_dataset(args.data)
    planner = Planner(args.profile, data, out, args.seeds, precision=precision)
    runs = longest_chains_first(planner.plan(), args.profile)
    if args.plan_json:
        return write_plan(args.plan_json, runs, args.profile)
    writable_dir(out)
    if args.run:
        return run_one(args, runs, out)
    slots = slots_of(parse_devices(args.devices), args.jobs_per_device)
    on_gpu = any(d.startswith("cuda") for d in slots)
    threads = max(1, len(os.sched_getaffinity(0)) // len(slots)) if on_gpu else 1
    if args.force:
        for run in runs:
            if run.output.is_dir():
                shutil.rmtree(run.output)
            else:
                run.output.unlink(missing_ok=True)
    results_path = out / "results.json"
    done = {r.name for r in runs if finished(r)}
    results = previous_results(results_path, args, done)
    results.update(profile=args.profile, data=dataset_name(data), settings=PROFILES[args.profile], precision=precision,
                   device=torch.cuda.get_device_name(slots[0]) if slots[0].startswith("cuda") else "cpu",
                   slots=slots, threads_per_run=threads, environment=environment())
    results["environment"]["command"] = portable(results["environment"]["command"], out, data)
    previous = results["runs"]
    results["runs"] = {r.name: run_record(r, None, previous.get(r.name, {}), out, data) for r in runs if r.name in done}
    todo = [r for r in runs if r.name not in done]
    print(f"reproduce --profile {args.profile}: {len(runs)} runs, {len(done)} already finished; "
          f"{len(slots)} at once on {', '.join(sorted(set(slots)))}, {threads} thread(s) each", flush=True)
    walls, started = {}, time.perf_counter()
    remaining = {"estimate": sum(estimate(r, args.profile) for r in todo), "spent": 0.0, "estimated_done": 0.0}

    def on_start(run, device):
        speed = remaining["spent"] / remaining["estimated_done"] if remaining["estimated_done"] else 1.0
        eta = remaining["estimate"] * speed / len(slots)
        cells = "; ".join(f"{t} {shown(label)}" for t, label in run.cells) or "shared"
        print(f"[{len(walls) + len(done) + 1}/{len(runs)}] {run.script} {run.name} on {device} ({cells})"
              f", ETA {clock(eta)}", flush=True)

    planned = len({r.seed for r in runs if r.cells})
    tabled_seeds = finished_seeds(runs, done)

    def on_finish(run, ok, seconds, last):
        nonlocal tabled_seeds
        walls[run.name] = seconds if ok else None
        remaining["estimate"] -= estimate(run, args.profile)
        remaining["spent"] += seconds
        remaining["estimated_done"] += estimate(run, args.profile)
        if not ok:
            print(f"  FAILED {run.name}: {last} (log: {log_file(run)})", flush=True)
            return
        results["runs"][run.name] = run_record(run, seconds, {}, out, data)
        write_json(results_path, results)
        seeds = finished_seeds(runs, set(results["runs"]))
        if len(tabled_seeds) < len(seeds) < planned:     # the tables of every seed come at the end
            tabled_seeds = seeds
            write_tables(out, dict(results, seeds_finished=(seeds, planned), runs={
                r.name: results["runs"][r.name] for r in runs if r.seed in seeds and r.name in results["runs"]}))
            print(f"  tables of the {len(seeds)} finished seed(s) of {planned} written to {out}/", flush=True)

    status = execute(todo, done, slots, threads, stage_argv, log_file, on_start, on_finish)
    recorded, results["runs"] = results["runs"], {}
    for run in runs:     # in plan order; entries of runs the plan no longer has are dropped
        if run.name in recorded:
            results["runs"][run.name] = recorded[run.name]
        elif run.name in previous:
            results["runs"][run.name] = previous[run.name]
    if todo:
        results["wall_s"] = results.get("wall_s", 0.0) + time.perf_counter() - started
        results["invocations"] = results.get("invocations", 0) + 1
    write_json(results_path, results)
    print("\n" + write_tables(out, results))
    failed = sorted(n for n, s in status.items() if s != "done")
    if failed:
        raise UserError(f"{len(failed)} run(s) did not finish: {', '.join(failed[:5])}"
                        f"{' ...' if len(failed) > 5 else ''}; see their logs, fix, and run the same command again")
    print(f"tables and results.json written to {out}/ in {clock(time.perf_counter() - started)}")


if __name__ == "__main__":
    main()
