"""reproduce.py: the plan shares what rows have in common, tables come out right from fixed
results, finished runs are skipped, and the micro profile runs end to end."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import REPO, SCRIPT_ENV

from reproduction.plan import Planner
from reproduction.tables import TABLES, collect, render


def quick_plan(seeds=1):
    return Planner("quick", Path("data"), Path("out"), seeds=seeds).plan()


def test_plan_shares_teachers_refiners_and_students():
    runs = quick_plan()
    scripts = Counter(r.script for r in runs)
    # ratios 5, 10, 20, 50, 100 % -> 5 teachers; a refiner for each ratio but 100 %;
    # 10 %: 2 baselines + 6 KD cells, other ratios: wkd_refine only -> 11 students
    assert scripts == {"train_teacher": 5, "train_cyclegan": 4, "train_student": 11, "evaluate": 18}
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    wkd_refine = next(r for r in runs if r.name == "seed0/r010/student-kd-ssim-refined_test_eval")
    assert set(wkd_refine.cells) == {("table1", "wkd_refine"), ("table2", "ssim, refined"),
                                     ("table4", "wkd_refine|10 %")}
    assert Counter(r.script for r in quick_plan(seeds=3)) == {k: 3 * v for k, v in scripts.items()}


def test_every_run_comes_after_the_runs_it_reads():
    written = set()
    for run in quick_plan():
        for arg in run.argv:
            if isinstance(arg, Path) and arg.suffix == ".pt" and arg != run.output:
                assert arg in written, f"{run.name} reads {arg} before it is written"
        written.add(run.output)


def test_every_table_cell_is_fed_by_a_run():
    fed = {cell for run in quick_plan() for cell in run.cells}
    for name, spec in TABLES.items():
        for row in spec["rows"]:
            assert (name, row) in fed, (name, row)


def fake_results():
    def run(cells, dice, hd95):
        metric = lambda mean: dict(mean=mean, std=0.5, median=mean, n=4, n_undefined=0)  # noqa: E731
        return dict(script="evaluate", cells=cells, wall_s=1.0, metrics=dict(dice=metric(dice), hd95=metric(hd95)))
    return {"runs": {"a": run([["table1", "kd"]], 0.8, 10.0), "b": run([["table1", "kd"]], 0.6, 14.0),
                     "c": run([["table4", "wkd_refine|5 %"]], 0.7, 3.0)}}


def test_tables_average_over_seeds_and_pivot_groups():
    tables = collect(fake_results())
    md, csv_text = render("table1", tables["table1"], "caption")
    kd_line = next(line for line in md.splitlines() if line.startswith("| kd |"))
    # two seeds: mean 0.7, sample std 0.1414
    assert "0.7000 ± 0.1414" in kd_line and "12.00 ± 2.83" in kd_line
    assert "| pseudo_label | –" in md            # no run for it: shown as missing, not zero
    assert csv_text.splitlines()[0].startswith("row,dice mean,dice spread")
    md4, _ = render("table4", tables["table4"], "caption")
    assert "wkd_refine dice" in md4.splitlines()[4]
    five = next(line for line in md4.splitlines() if line.startswith("| 5 % |"))
    # one seed: the spread is the case-level std of that run
    assert "0.7000 ± 0.5000" in five and five.count("–") == 2


def reproduce(data, out):
    proc = subprocess.run([sys.executable, str(REPO / "reproduce.py"), "--profile", "micro", "--data", str(data),
                           "--out", str(out)], env=SCRIPT_ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_micro_profile_end_to_end_then_skips_finished_runs(tiny_data, tmp_path):
    out = tmp_path / "micro"
    first = reproduce(tiny_data, out)
    assert "38 runs, 0 already finished" in first
    for name in TABLES:
        assert (out / f"{name}.md").is_file() and (out / f"{name}.csv").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["profile"] == "micro" and len(results["runs"]) == 38
    assert all(r["wall_s"] is not None for r in results["runs"].values())
    evaluated = [r for r in results["runs"].values() if r["script"] == "evaluate"]
    assert all(0.0 <= r["metrics"]["dice"]["mean"] <= 1.0 for r in evaluated)

    # A lost evaluation is redone, everything else is reused.
    (out / "seed0/r010/teacher_test_eval/summary.json").unlink()
    second = reproduce(tiny_data, out)
    assert "38 runs, 37 already finished" in second
    assert "evaluate seed0/r010/teacher_test_eval" in second and "train_" not in second.split("finished")[1]
