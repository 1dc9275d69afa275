"""Reproduce the paper's four tables (SPEC section 7) with one command.

    python reproduce.py --profile quick     # CPU, minutes: small size and widths, one seed
    python reproduce.py --profile paper     # GPU: full phantom resolution, three seeds

Runs every stage script each table cell needs, through the scripts' own entry points, sharing
what rows have in common (one teacher per labelled ratio and seed, one refiner per teacher).
Finished runs are reused, so an interrupted reproduction continues where it stopped; --force
redoes everything. Writes into --out: table1..4 as .md and .csv, tables.md with all four, and
results.json with every per-run number, the environment and each run's wall time.
"""
import dataclasses
import importlib
import json
import shutil
import time
from pathlib import Path

import torch

from data import prepare_dataset
from engine.cli import DEFAULT_DATA, parse, select_device, setting, writable_dir
from engine.records import environment, write_json
from engine.state import read_checkpoint
from errors import UserError, exit_on_user_error
from reproduction.plan import PROFILES, Planner
from reproduction.tables import TABLES, collect, render

# Rough cost of one step relative to a teacher step, for the ETA; refined by measured times.
STEP_COST = dict(train_teacher=1.0, train_cyclegan=3.0, train_student=2.0)
EVAL_COST = 40.0


@dataclasses.dataclass
class ReproduceSettings:
    profile: str = setting("quick", "quick: CPU minutes; paper: GPU, full size, three seeds; micro: a seconds-long "
                                    "check", choices=tuple(PROFILES))
    data: Path = setting(DEFAULT_DATA, "dataset root; the embedded phantom is generated there on first use")
    out: Path | None = setting(None, "output folder; default: results/<profile>")
    seeds: int | None = setting(None, "number of seeds; default: the profile's", within="[1, inf)")
    device: str = setting("auto", "where to run every stage", choices=("auto", "cpu", "cuda"))
    force: bool = setting(False, "redo every run instead of reusing finished ones")


def finished(run) -> bool:
    if run.script == "evaluate":
        return (run.output / "summary.json").is_file()
    if not run.output.is_file():
        return False
    return read_checkpoint(run.output, "--out").get("step", 0) >= run.steps


def cost(run) -> float:
    return EVAL_COST if run.script == "evaluate" else STEP_COST[run.script] * run.steps


def execute(run) -> None:
    """Call the stage script's main() with the run's arguments; resume a run left unfinished."""
    argv = [str(a) for a in run.argv]
    if run.script != "evaluate" and run.output.is_file():
        argv.append("--resume")
    try:
        importlib.import_module(run.script).main(argv)
    except SystemExit as stop:
        if stop.code:
            raise UserError(f"run {run.name} stopped (its error is above); fix it and rerun the same command "
                            f"to continue") from None


def record(run, wall: float | None, previous: dict) -> dict:
    entry = dict(script=run.script, argv=[str(a) for a in run.argv], steps=run.steps, cells=run.cells,
                 wall_s=wall if wall is not None else previous.get("wall_s"))
    if run.script == "evaluate":
        summary = json.loads((run.output / "summary.json").read_text())
        entry["metrics"] = {m: {k: s[k] for k in ("mean", "std", "median", "n", "n_undefined")}
                            for m, s in summary["metrics"].items()}
    return entry


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def caption(results: dict, seeds: int) -> str:
    walls: dict = {}
    for run in results["runs"].values():
        walls[run["script"]] = walls.get(run["script"], 0.0) + (run["wall_s"] or 0.0)
    spread = "std over seeds" if seeds > 1 else "std over the scored cases (one seed)"
    stages = ", ".join(f"{s.replace('train_', '')} {clock(w)}" for s, w in walls.items())
    env = results["environment"]
    return (f"Profile `{results['profile']}`, data `{results['data']}`, device {results['device']}, "
            f"{seeds} seed(s), code {env['git'][:12]}; mean ± {spread}. Wall time by stage: {stages}.")


def write_tables(out: Path, results: dict, seeds: int) -> str:
    collected, text = collect(results), []
    for name in TABLES:
        md, table_csv = render(name, collected[name], caption(results, seeds))
        (out / f"{name}.md").write_text(md)
        (out / f"{name}.csv").write_text(table_csv)
        text.append(md)
    (out / "tables.md").write_text("\n".join(text))
    return "\n".join(text)


@exit_on_user_error
def main(argv=None):
    args = parse(ReproduceSettings, __doc__, argv)
    device = select_device(args.device)
    out = writable_dir(args.out or Path("results") / args.profile)
    data = prepare_dataset(args.data)
    planner = Planner(args.profile, data, out, args.seeds, args.device)
    runs = planner.plan()
    seeds = len(planner.seeds)
    if args.force:
        for run in runs:
            if run.output.is_dir():
                shutil.rmtree(run.output)
            else:
                run.output.unlink(missing_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() and not args.force else {"runs": {}}
    results.update(profile=args.profile, data=str(data), device=torch.cuda.get_device_name(device)
                   if device.type == "cuda" else "cpu", settings=PROFILES[args.profile],
                   environment=environment())

    todo = {r.name for r in runs if not finished(r)}
    remaining = sum(cost(r) for r in runs if r.name in todo)
    print(f"reproduce --profile {args.profile}: {len(runs)} runs, {len(runs) - len(todo)} already finished")
    spent, done_cost, start = 0.0, 0.0, time.perf_counter()
    for i, run in enumerate(runs, 1):
        previous = results["runs"].get(run.name, {})
        wall = None
        if run.name in todo:
            eta = f", ETA {clock(spent / done_cost * remaining)}" if done_cost else ""
            cells = "; ".join(f"{t} {label.replace('|', ' ')}" for t, label in run.cells) or "shared"
            steps = f", {run.steps} steps" if run.steps else ""
            print(f"[{i}/{len(runs)}] {run.script} {run.name} ({cells}{steps}){eta}", flush=True)
            t0 = time.perf_counter()
            execute(run)
            wall = time.perf_counter() - t0
            spent, done_cost, remaining = spent + wall, done_cost + cost(run), remaining - cost(run)
        results["runs"][run.name] = record(run, wall, previous)
        write_json(results_path, results)
    results["wall_s_this_invocation"] = time.perf_counter() - start
    write_json(results_path, results)
    print("\n" + write_tables(out, results, seeds))
    print(f"tables and results.json written to {out}/ in {clock(time.perf_counter() - start)}")


if __name__ == "__main__":
    main()
