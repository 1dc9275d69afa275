"""Reproduce the paper's four tables (SPEC section 7) with one command.

    python reproduce.py --profile quick                    # CPU: small size and widths, 7 seeds for the claims
    python reproduce.py --profile paper --devices cuda:0,cuda:1,cuda:2,cuda:3

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
which their caption counts), so a reproduction stopped at any moment leaves valid tables. On a
cluster, its scheduler runs the plan one run at a time (`python -m reproduction.cluster`), and
this script then writes the tables.
"""
import csv
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from engine.cli import parse, setting, writable_dir
from engine.records import environment, write_json, write_text
from engine.state import read_checkpoint
from errors import UserError, exit_on_user_error
from reproduction.schedule import estimate, longest_chains_first
from reproduction.plan import PROFILES, PlanSettings, plan_for, shown
from reproduction.schedule import clock, discard, execute, finished, log_file, parse_devices, slots_of, stage_argv
from reproduction.figures import draw_figures
from reproduction.tables import CASE_METRICS, collect, render, table_specs


@dataclasses.dataclass
class ReproduceSettings(PlanSettings):
    devices: str = setting("auto", "comma-separated devices to run on, e.g. cuda:0,cuda:1 or cpu,cpu; auto: every "
                                   "GPU, or one CPU slot per core without one")
    jobs_per_device: int = setting(1, "runs at once on each listed device", within="[1, inf)")
    force: bool = setting(False, "redo every run instead of reusing finished ones")


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


def finished_seeds(runs: list, done: set) -> list:
    """The seeds all of whose table runs (those that feed a cell) are in `done`."""
    table_runs = [r for r in runs if r.cells]
    return sorted({r.seed for r in table_runs} - {r.seed for r in table_runs if r.name not in done})


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
    runs, out, data, precision = plan_for(args)
    runs = longest_chains_first(runs, args.profile)
    writable_dir(out)
    slots = slots_of(parse_devices(args.devices), args.jobs_per_device)
    on_gpu = any(d.startswith("cuda") for d in slots)
    threads = max(1, len(os.sched_getaffinity(0)) // len(slots)) if on_gpu else 1
    if args.force:
        for run in runs:
            discard(run)
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
