"""reproduce.py: the plan shares what rows have in common and orders runs after their inputs, the
tables and their paired intervals come out right from fixed results, and finished runs are
skipped (the micro reproduction is the session's one, which tests/test_classes.py and
tests/test_cluster.py read too)."""
import json
import math
import shutil
from collections import Counter, namedtuple
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
from conftest import claim_results, evaluation, run_script
from scipy import stats

from reproduction.plan import BESIDE, CLAIMS, GATED, HEADROOM, PROFILES, Contrast, Planner
from reproduction.tables import collect, combination, paired_difference, render, table_specs


def quick_plan(seeds=None):
    return Planner("quick", Path("/d"), Path("/o"), seeds=seeds).plan()


def test_plan_shares_teachers_refiners_and_students():
    runs = quick_plan()
    scripts = Counter(r.script for r in runs)
    seeds = PROFILES["quick"]["seeds"]
    # primary seeds: a teacher, its refiner, the control and the 2x2 of KD weight x targets, their test
    # evaluations, the teacher's and Table 3's three; oracle seeds: two KD students; baseline seeds: four
    # other methods' students and the 100 % teacher; ablation seeds: three other KD cells; efficiency
    # seeds: at 10 % a teacher, a refiner and Table 4's four students
    primary, baselines = 5, 4
    assert scripts == {
        "train_teacher": seeds["primary"] + seeds["baselines"] + seeds["efficiency"],
        "train_cyclegan": seeds["primary"] + seeds["efficiency"],
        "train_student": primary * seeds["primary"] + 2 * seeds["oracle"] + baselines * seeds["baselines"]
        + 3 * seeds["ablation"] + 4 * seeds["efficiency"],
        "evaluate": (1 + primary + 3) * seeds["primary"] + 2 * seeds["oracle"] + (baselines + 1) * seeds["baselines"]
        + 3 * seeds["ablation"] + 4 * seeds["efficiency"]}
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    wkd_refine = next(r for r in runs if r.name == "seed0/r0020/student-kd-ssim-refined_test_eval")
    assert set(wkd_refine.cells) == {("table1", "wkd_refine"), ("table2", "ssim, refined"),
                                     ("table4", "wkd_refine|2 %")}
    kd_refine = next(r for r in runs if r.name == "seed0/r0020/student-kd-none-refined.pt")
    assert kd_refine.argv[kd_refine.argv.index("--method") + 1] == "kd_refine" and "--refiner" in kd_refine.argv
    oracles = [r for r in runs if "--oracle" in r.argv]
    assert sorted((r.seed, r.argv[r.argv.index("--oracle") + 1]) for r in oracles) == \
        [(s, o) for s in range(seeds["oracle"]) for o in ("targets", "weight")]
    control = next(r for r in runs if r.name == "seed1/r0020/student-supervised_test_eval")
    assert control.cells == [("table1", "supervised"), ("table4", "supervised|2 %")] and control.seed == 1
    refiner = next(r for r in runs if r.name == "seed1/r0020/cyclegan.pt")
    assert refiner.cells == [("refiner", "2 %")]
    # Table 4's modern baselines at 2 % are Table 1's runs, on its baseline seeds only
    bcp = [r for r in runs if ("table4", "bcp|2 %") in r.cells]
    assert sorted(r.seed for r in bcp) == list(range(seeds["baselines"]))
    assert all(("table1", "bcp") in r.cells for r in bcp)
    assert [r.seed for r in runs if ("table4", "unimatch|10 %") in r.cells] == list(range(seeds["efficiency"]))


def test_every_run_comes_after_the_runs_it_reads():
    done = set()
    by_output = {r.output: r.name for r in quick_plan()}
    for run in quick_plan():
        reads = {by_output[a] for a in run.argv if isinstance(a, Path) and a in by_output and a != run.output}
        assert reads == set(run.needs) and reads <= done, run.name
        done.add(run.name)


def test_results_of_other_settings_are_not_reused(tmp_path):
    import reproduce
    path = tmp_path / "results.json"
    args = reproduce.parse(reproduce.ReproduceSettings, "", ["--profile", "micro"])
    same = dict(profile="micro", settings=PROFILES["micro"], precision="fp32", runs={"a": {"seed": 0}}, wall_s=5.0)
    path.write_text(json.dumps(same))
    assert reproduce.previous_results(path, args, {"a"})["runs"] == {"a": {"seed": 0}}
    # a fresh clone: the committed results.json, but no run finished on disk
    assert reproduce.previous_results(path, args, set()) == {"runs": {}}
    path.write_text(json.dumps(dict(same, settings=dict(PROFILES["micro"], ratio=0.7))))
    assert reproduce.previous_results(path, args, {"a"}) == {"runs": {}}


def test_the_claims_profile_plans_the_claims_alone():
    runs = Planner("claims", Path("/d"), Path("/o")).plan()
    rows = {label for r in runs for table, label in r.cells if table == "table1"}
    assert rows == {"teacher", "supervised", "kd", "wkd", "kd_refine", "wkd_refine"}
    assert {r.seed for r in runs} == set(range(6)) and all("r0020" in r.name for r in runs)
    assert Counter(r.script for r in runs)["train_student"] == 6 * 5


def test_tables_of_the_finished_seeds_say_so():
    Run = namedtuple("Run", "name seed cells")
    runs = [Run("t0", 0, []), Run("e0", 0, ["x"]), Run("f0", 0, ["y"]), Run("e1", 1, ["x"]), Run("e2", 2, ["x"])]
    import reproduce
    assert reproduce.finished_seeds(runs, {"e0", "e1", "e2"}) == [1, 2]       # seed 0 still waits for f0
    assert reproduce.finished_seeds(runs, {"e0", "f0", "e2"}) == [0, 2]       # training runs feed no table
    assert reproduce.partial_note(None) == ""
    assert "the 2 of 3 planned seeds whose table runs had all finished (seeds 0, 2)" in reproduce.partial_note(
        ([0, 2], 3))


def test_a_failed_gpu_run_gets_its_slot_a_fresh_worker(monkeypatch):
    """A CUDA error can spoil the worker's process for every later run; a CPU one cannot, so a CPU
    slot keeps its worker unless the worker died."""
    from reproduction import schedule
    pools = []

    class Pool:
        def __init__(self, threads):
            self.ran = []
            pools.append(self)

        def submit(self, fn, script, argv, log):
            self.ran.append(script)
            future = Future()
            if script == "dies":
                future.set_exception(BrokenProcessPool("killed"))
            else:
                future.set_result((script == "ok", 1.0, ""))
            return future

        def shutdown(self, **kwargs):
            pass
    monkeypatch.setattr(schedule, "_pool", Pool)
    Run = namedtuple("Run", "name needs script")
    runs = [Run("a", [], "fails"), Run("b", [], "ok"), Run("c", [], "dies"), Run("d", [], "ok")]
    for device, workers in (("cuda:1", [["fails"], ["ok", "dies"], ["ok"]]),
                            ("cpu", [["fails", "ok", "dies"], ["ok"]])):
        pools.clear()
        status = schedule.execute(runs, set(), [device], 1, lambda run, d: [], lambda run: "log", lambda *a: None,
                                  lambda *a: None)
        assert [pool.ran for pool in pools] == workers, device
        assert status == dict(a="failed", b="done", c="failed", d="done")


def test_every_table_cell_is_fed_by_a_run():
    fed = {cell for run in quick_plan() for cell in run.cells} | set(GATED)
    for name, spec in table_specs(PROFILES["quick"]).items():
        for row in spec["rows"]:
            assert (name, row) in fed, (name, row)
    for contrast in (*CLAIMS, *BESIDE, *(c for _, headroom, taken in HEADROOM for c in (headroom, taken))):
        assert all(row in fed for row, _ in contrast.terms), contrast.name


def test_paired_differences_are_t_intervals_over_seeds_or_over_cases():
    control = {0: [0.5, 0.6, 0.7], 1: [0.4, 0.6, 0.8], 2: [0.5, 0.5, 0.5]}
    method = {0: [0.6, 0.6, 0.8], 1: [0.5, 0.7, 0.8], 2: [0.6, 0.6, 0.6]}
    runs = {s: evaluation([], s, v) for s, v in method.items()}
    controls = {s: evaluation([], s, v) for s, v in control.items()}
    d = paired_difference(runs, controls, "dice")
    per_seed = [np.mean(np.subtract(method[s], control[s])) for s in range(3)]
    half = stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / math.sqrt(3)
    assert d["over"] == "seeds" and d["per_seed"] == pytest.approx(per_seed)
    assert (d["low"], d["mean"], d["high"]) == pytest.approx((np.mean(per_seed) - half, np.mean(per_seed),
                                                              np.mean(per_seed) + half))
    one = paired_difference({0: runs[0]}, {0: controls[0]}, "dice")
    cases = np.subtract(method[0], control[0])
    assert one["over"] == "cases" and one["high"] - one["mean"] == pytest.approx(
        stats.t.ppf(0.975, 2) * cases.std(ddof=1) / math.sqrt(3))


def test_tables_average_over_seeds_show_missing_cells_and_mark_intervals():
    results = {"runs": {
        "a": evaluation([["table1", "kd"]], 0, [0.8, 0.9, 1.0]), "b": evaluation([["table1", "kd"]], 1, [0.6, 0.6, 0.6]),
        "c": evaluation([["table1", "supervised"]], 0, [0.7, 0.8, 0.9]),
        "d": evaluation([["table1", "supervised"]], 1, [0.5, 0.5, 0.5])}}
    spec = table_specs(PROFILES["quick"])["table1"]
    spec = dict(spec, metrics=["dice"])
    md, csv_text = render("table1", spec, collect(results), "caption")
    kd_line = next(line for line in md.splitlines() if line.startswith("| kd |"))
    assert "0.7500 ± 0.2121" in kd_line                  # two seeds: mean of 0.9 and 0.6, sample std
    assert "| pseudo_label | 0 | –" in md                # no run for it: shown as missing, not zero
    delta = next(line for line in md.splitlines() if line.startswith("| kd |") and "[" in line)
    assert "+0.1000 [+0.1000, +0.1000] *" in delta       # +0.1 on every case of both seeds
    assert csv_text.splitlines()[0].startswith("row,metric,mean,spread,seeds,delta")
    # Table 4: one row a ratio, one count per method where the methods' seeds differ
    results = {"runs": {f"{method}{seed}": evaluation([["table4", f"{method}|2 %"]], seed, [0.5, 0.6])
                        for method, seeds in (("supervised", 3), ("wkd_refine", 3), ("bcp", 1), ("unimatch", 1))
                        for seed in range(seeds)}}
    md, _ = render("table4", dict(table_specs(PROFILES["quick"])["table4"], metrics=["dice"]), collect(results), "")
    assert "| 2 % | 3 / 3 / 1 / 1 |" in md and "| 10 % | 0 |" in md


def test_micro_profile_end_to_end_then_skips_finished_runs(micro_reproduction, tmp_path):
    data, out, first = micro_reproduction
    n = len(Planner("micro", data, out).plan())
    assert f"{n} runs, 0 already finished" in first and "2 at once on cpu" in first
    for name in table_specs(PROFILES["micro"]):
        assert (out / f"{name}.md").is_file() and (out / f"{name}.csv").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["profile"] == "micro" and len(results["runs"]) == n
    assert str(data) not in (out / "results.json").read_text()      # no path of this machine
    evaluated = [r for r in results["runs"].values() if r["script"] == "evaluate"]
    assert all(0.0 <= r["metrics"]["dice"]["mean"] <= 1.0 and len(r["cases"]["dice"]) == r["metrics"]["dice"]["n"]
               for r in evaluated)
    assert (out / "seed0/r0300/teacher.pt.log").is_file()
    # the first of the two seeds to finish had its tables written on its own, the full ones at the end
    assert "tables of the 1 finished seed(s) of 2 written" in first
    assert "planned seeds whose table runs had all finished" not in (out / "tables.md").read_text()

    # A lost evaluation is redone, everything else is reused (in a copy: the tests share the original).
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "seed0/r0300/teacher_test_eval/summary.json").unlink()
    second = run_script("reproduce.py", "--profile", "micro", "--data", data, "--out", copy,
                        "--devices", "cpu").stdout      # one worker: the one run to redo needs no more
    assert f"{n} runs, {n - 1} already finished" in second
    assert "evaluate seed0/r0300/teacher_test_eval" in second and "train_" not in second.split("finished")[1]


def test_claims_are_read_by_the_fixed_rule():
    from reproduction.tables import claims, verdict
    (_, weight), (_, refine), (_, method) = claims(collect(claim_results(0.02)))
    assert verdict(weight["dice"], "dice") == "helps" and verdict(weight["hd95"], "hd95") == "hurts"
    assert weight["dice"]["above_zero"] == 6 and weight["dice"]["n"] == 6
    assert verdict(refine["dice"], "dice").startswith("no difference larger than")


def test_a_contrast_of_four_rows_is_the_per_case_combination_on_shared_seeds_and_cases():
    rows = {"a": [0.9, 0.8, 0.7], "b": [0.5, 0.5, 0.6], "c": [0.4, 0.7, 0.7], "d": [0.3, 0.3, 0.3]}
    cells = {("table1", name): {seed: evaluation([], seed, np.add(v, 0.05 * seed * (name == "a")))
                                for seed in range(3)} for name, v in rows.items()}
    del cells[("table1", "d")][2]                                     # the last seed lacks a row: left out
    interaction = Contrast("x", ((("table1", "a"), 1), (("table1", "b"), -1), (("table1", "c"), -1),
                                 (("table1", "d"), 1)))
    d = combination([(cells[row], c) for row, c in interaction.terms], "dice")
    per_case = np.array(rows["a"]) - rows["b"] - rows["c"] + rows["d"]
    assert d["seeds"] == [0, 1] and d["per_seed"] == pytest.approx([per_case.mean(), per_case.mean() + 0.05])
    assert interaction.shown() == "`a` - `b` - `c` + `d`" and d["above_zero"] == 1      # -0.033 and +0.017


def test_gated_rows_take_the_refined_run_where_the_refiner_passed_and_the_plain_one_elsewhere():
    results = {"runs": {}}
    for seed, passes in ((0, 1.0), (1, 0.0)):
        results["runs"][f"refiner{seed}"] = dict(seed=seed, cells=[["refiner", "2 %"]], keep_rule=dict(passes=passes))
        for row, value in (("ssim, refined", 0.9), ("ssim, plain", 0.6)):
            results["runs"][f"{row}{seed}"] = evaluation([["table2", row]], seed, [value])
    gated = collect(results)[("table2", "ssim, refined if kept")]
    assert {seed: run["cases"]["dice"] for seed, run in gated.items()} == {0: [0.9], 1: [0.6]}
