"""The reproduction on a cluster's scheduler: the plan for it, and one run of it.

    python -m reproduction.cluster --profile paper --plan-json plan.json
    python -m reproduction.cluster --profile paper --run seed0/r0020/teacher.pt --device cuda:0

--plan-json writes the plan that `reproduce.py` with the same --profile, --data, --out, --seeds
and --precision runs, in the order it starts the runs, and stops: each run's name, command line,
output, the runs whose outputs it reads (`needs`) and its estimated seconds, then the estimated
device time and wall time on 1, 2 and 8 devices. A scheduler starts each run once the runs it
needs are done, as --run NAME: that run alone, in this process, on --device (an unfinished
training run resumes; a finished run is skipped unless --force). `reproduce.py` with the same flags
then finds every run finished and writes the tables.
"""
import dataclasses
import sys
from pathlib import Path

import torch

from engine.cli import REPO, parse, setting, writable_dir, writable_file
from engine.records import write_json
from errors import UserError, exit_on_user_error

from .plan import PlanSettings, plan_for
from .schedule import (clock, discard, estimate, finished, log_file, longest_chains_first, makespan,
                       parse_devices, run_in_slot, stage_argv)


@dataclasses.dataclass
class ClusterSettings(PlanSettings):
    plan_json: Path | None = setting(None, "write the plan (every run's command, output, inputs and estimated cost) "
                                           "to this file and stop")
    run: str | None = setting(None, "run exactly this run of the plan (by name, see --plan-json), then stop")
    device: str = setting("auto", "device of --run: auto (the first GPU, else the CPU), cpu, cuda or cuda:N")
    force: bool = setting(False, "redo the --run from its start, even if it has finished")


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


def run_one(s: ClusterSettings, runs: list) -> None:
    """--run NAME: exactly one run of the plan, in this process."""
    run = next((r for r in runs if r.name == s.run), None)
    if run is None:
        raise UserError(f"--run {s.run}: no such run in the {s.profile} plan (see --plan-json)")
    if s.force:
        discard(run)
    elif finished(run):
        print(f"{run.name}: finished already; nothing to do")
        return
    device = parse_devices(s.device, "--device")[0]
    if device == "cpu":
        torch.set_num_threads(1)            # as every CPU run of a whole reproduction
    ok, seconds, last = run_in_slot(run.script, stage_argv(run, device), str(log_file(run)))
    if not ok:
        raise UserError(f"run {run.name} failed after {seconds:.0f} s: {last} (log: {log_file(run)})")
    print(f"{run.name}: done in {clock(seconds)}")


@exit_on_user_error
def main(argv=None):
    s = parse(ClusterSettings, __doc__, argv)
    if (s.plan_json is None) == (s.run is None):
        raise UserError("give --plan-json FILE or --run NAME")
    runs, out, _, _ = plan_for(s)
    runs = longest_chains_first(runs, s.profile)
    if s.plan_json:
        return write_plan(s.plan_json, runs, s.profile)
    writable_dir(out)
    return run_one(s, runs)


if __name__ == "__main__":
    main()
