"""The cost model (reproduction.schedule) orders the runs longest chains first without breaking a
dependency; reproduction.cluster writes the plan for a scheduler, its single runs run and skip when
finished, and one worker running a chain gives the numbers the two-worker micro reproduction gave."""
import json
from pathlib import Path

import pytest
import torch
from conftest import run_main, run_scripts
from test_cli_errors import assert_one_line_error

from reproduction.schedule import longest_chains_first, makespan
from reproduction.plan import Planner

CHAIN = ("cyclegan.pt", "student-kd-ssim-refined.pt", "student-kd-ssim-refined_test_eval")


def test_longest_chains_start_first_and_inputs_still_come_first():
    planned = Planner("quick", Path("/d"), Path("/o")).plan()
    ordered = longest_chains_first(planned, "quick")
    assert sorted(r.name for r in ordered) == sorted(r.name for r in planned)
    position = {r.name: i for i, r in enumerate(ordered)}
    assert all(position[n] < position[r.name] for r in ordered for n in r.needs)
    # the teachers at the Table 1 ratio start the longest chains (teacher, refiner, student, evaluation)
    assert {r.script for r in ordered[:3]} == {"train_teacher"}
    assert makespan(ordered, "quick", 2) < makespan(planned, "quick", 2)


@pytest.fixture(scope="module")
def cluster(micro_reproduction, tmp_path_factory):
    """The micro plan written with --plan-json (in this process), then its first run (a teacher),
    the refiner, the refined-KD student and that student's evaluation that follow it, run one by
    one with --run in one process, as one worker runs them, and the first run asked for again,
    then forced."""
    data = micro_reproduction[0]
    plan_file, out = tmp_path_factory.mktemp("cluster") / "plan.json", tmp_path_factory.mktemp("cluster") / "out"
    common = ["--profile", "micro", "--data", data, "--out", out]
    assert run_main("reproduction/cluster.py", *common, "--plan-json", plan_file).returncode == 0   # no training
    plan = json.loads(plan_file.read_text())
    planned_only = not out.exists()
    first = plan["runs"][0]["name"]
    names = [first, *(str(Path(first).parent / name) for name in CHAIN)]
    calls = [("reproduction/cluster.py", *common, "--run", name) for name in [*names, first]]
    stdout = run_scripts(*calls, (*calls[0], "--force")).stdout
    return dict(plan=plan, planned_only=planned_only, names=names, out=out, stdout=stdout, common=common)


def test_plan_json_and_single_runs_for_a_cluster(cluster):
    first = cluster["plan"]["runs"][0]
    assert first["needs"] == [] and first["estimated_seconds"] > 0 and first["command"][1].endswith(".py")
    assert cluster["planned_only"]                     # a plan only: nothing ran
    planned = {r["name"]: r for r in cluster["plan"]["runs"]}
    assert all(name in planned for name in cluster["names"])
    lines = cluster["stdout"].splitlines()
    assert [line.split(":")[0] for line in lines if "done in" in line] == [*cluster["names"], first["name"]]
    assert lines[-2] == f"{first['name']}: finished already; nothing to do"
    assert lines[-1].startswith(f"{first['name']}: done in")        # --force: run again


def test_one_worker_gives_the_numbers_two_workers_give(micro_reproduction, cluster):
    """The runs of one chain, run one after another in one process, give the weights and per-case
    numbers the two-worker reproduction gave them."""
    two_workers, one_worker = micro_reproduction[1], cluster["out"]
    for name in cluster["names"]:
        if name.endswith(".pt"):
            a, b = (torch.load(out / name, weights_only=True) for out in (two_workers, one_worker))
            assert a["step"] == b["step"] and repr(a["metrics"]) == repr(b["metrics"])     # NaN alike
            weights = [(a["model"], b["model"])] + [(a["train_state"][k], b["train_state"][k])
                                                    for k in ("model", "nets") if k in a["train_state"]]
            for wa, wb in weights:
                assert wa.keys() == wb.keys() and all(torch.equal(v, wb[k]) for k, v in wa.items()), name
        else:
            assert (two_workers / name / "metrics.csv").read_text() == (one_worker / name / "metrics.csv").read_text()
            a, b = (json.loads((out / name / "summary.json").read_text())["metrics"] for out in (two_workers, one_worker))
            assert json.dumps(a) == json.dumps(b)


def test_a_plan_or_a_run_must_be_asked_for_and_the_run_must_be_planned(cluster):
    assert_one_line_error(run_main("reproduction/cluster.py", *cluster["common"]), "--plan-json", "--run")
    assert_one_line_error(run_main("reproduction/cluster.py", *cluster["common"], "--run", "seed9/teacher.pt"),
                          "--run seed9/teacher.pt", "micro plan")
