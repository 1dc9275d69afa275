"""The GPU session script, run whole on the CPU (the Triton interpreter, toy sizes) under a deadline
short enough to cut most phases at their caps: the phases run in order, none outlives its cap,
and every file the session leaves is there, parses and is within what the collector takes. Then
the parts a short deadline cuts, each on its own: step times read from train.jsonl and the paper
plan's predicted wall time; the KD calls of the paper plan's students, recorded and replayed in
their dtypes and layouts, and a wrong gradient caught."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import kernels.kd_triton
from bench import gpu_session, stage_times, train_layouts
from bench.check_rows import MAX_FILE_BYTES
from engine.cli import REPO
from reproduction.plan import Planner

FILES = ["claims_logs.tar.gz", "claims_results.json", "claims_tables.md", "kernels.jsonl", "layouts.jsonl",
         "memcheck.log", "session.jsonl", "step_times.jsonl"]
MINUTES = 0.6


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_session_runs_its_phases_in_order_within_the_deadline_and_leaves_its_eight_files(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_session", "--out-dir", str(out), "--work",
                           str(tmp_path / "work"), "--minutes", str(MINUTES), "--size", "tiny"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert all(p.stat().st_size < MAX_FILE_BYTES for p in out.iterdir())
    session = lines(out / "session.jsonl")
    assert [r["phase"] for r in session] == ["environment", "kernels", "layouts", "memcheck", "step_times", "claims",
                                             "files"]
    phases = {r["phase"]: r for r in session}
    for name in ("kernels", "layouts", "step_times", "claims"):
        assert phases[name]["ended"] in ("finished", "stopped at its cap")
        assert phases[name]["seconds"] <= phases[name]["cap_s"] + 5, name      # the kill's grace at most
    assert phases["files"]["ok"] and phases["files"]["seconds"] <= MINUTES * 60 + 5
    assert phases["memcheck"] == dict(phase="memcheck", ended="skipped", reason="no CUDA device")
    assert "not run: no CUDA device" in (out / "memcheck.log").read_text()
    # cut short (on a busy machine perhaps before a row), but whole rows only, the kernel check's four
    # files in one in their order
    kernel_rows = lines(out / "kernels.jsonl")
    files = [r["file"] for r in kernel_rows]
    assert files == sorted(files, key=gpu_session.KERNEL_FILES.index)
    assert not kernel_rows or kernel_rows[0]["step"] == "environment"
    for name in ("layouts.jsonl", "step_times.jsonl"):
        lines(out / name)
    assert "runs" in json.loads((out / "claims_results.json").read_text())
    assert (out / "claims_tables.md").read_text().strip()
    with tarfile.open(out / "claims_logs.tar.gz") as tar:
        assert all(name.endswith((".log", "train.jsonl")) for name in tar.getnames())


def test_step_times_come_from_train_jsonl_after_the_warm_up(tmp_path):
    out = tmp_path / "student.pt"
    logs = tmp_path / "student_logs"
    logs.mkdir()
    times = [5.0, 0.3, 0.1, 0.2, 0.4, 0.25]
    logs.joinpath("train.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "train": {"sup": 1.0}}) + "\n" + json.dumps({"step": i + 1, "time": {"step_s": t}})
        + "\n" for i, t in enumerate(times)))
    call = ["s", "train_student", ["--out", str(out), "--method", "kd", "--weight", "agree", "--refiner", "r.pt"], "l"]
    row = stage_times.step_row(call, {"s": dict(ok=True, seconds=8.0, last="")}, warmup=1, autotune=True, at_once=1)
    assert row["config"] == "train_student kd agree refined" and row["timed_steps"] == 5
    assert row["median_step_s"] == 0.25 and row["startup_s"] == pytest.approx(8.0 - sum(times))
    failed = stage_times.step_row(call, {"s": dict(ok=False, seconds=1.0, last="error: boom")}, warmup=1)
    assert not failed["ok"] and failed["error"] == "error: boom"


def test_the_paper_plan_is_predicted_from_the_measured_step_times():
    rows = [dict(ok=True, config="train_teacher", median_step_s=0.01, startup_s=5.0),
            dict(ok=True, config="train_cyclegan", median_step_s=0.07, startup_s=5.0),
            dict(ok=True, config="train_student wkd_refine ssim refined", median_step_s=0.04, startup_s=5.0),
            dict(ok=True, config="train_student supervised - plain", median_step_s=0.02, startup_s=5.0)]
    cases = dict(labeled=8, unlabeled=400, val=60, test=120)
    evaluation = dict(seconds=12.0, cases=120)
    alone = stage_times.prediction(rows, evaluation, cases, {}, Path("/d"), Path("/w"))
    runs = Planner("paper", Path("/d"), Path("/w")).plan()
    teacher = next(r for r in runs if r.script == "train_teacher")
    cost = stage_times.cost_model(rows, 0.1, cases, {})
    assert cost(teacher) == 5.0 + teacher.steps * 0.01
    other = next(r for r in runs if stage_times.config(r.script, r.argv) == "train_student kd none plain")
    assert cost(other) == 5.0 + other.steps * 0.04           # measured nowhere: the slowest student's
    assert "train_student kd none plain" in alone["unmeasured_configs"]
    assert alone["runs"] == len(runs) and alone["wall_s"]["8 GPUs, 1 at once"] < alone["wall_s"]["1 GPU, 1 at once"]
    assert alone["wall_s"]["1 GPU, 1 at once"] >= alone["device_s"] - 1
    shared = stage_times.prediction(rows, evaluation, cases, dict(train_teacher=1.5, train_cyclegan=1.5,
                                                                   train_student=1.5), Path("/d"), Path("/w"))
    assert shared["wall_s"]["1 GPU, 2 at once"] < shared["wall_s"]["1 GPU, 1 at once"]


def test_layouts_are_replayed_as_recorded():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert train_layouts.memory_order(x) == [0, 2, 3, 1]
    copy = train_layouts.laid_out(torch.randn(2, 3, 4, 5), [0, 2, 3, 1], torch.bfloat16)
    assert copy.stride() == x.stride() and copy.dtype == torch.bfloat16
    assert train_layouts.described(x) == dict(dtype="float32", order=[0, 2, 3, 1], dense=True)
    assert not train_layouts.described(torch.randn(2, 3, 4, 10)[..., :5])["dense"]


def test_the_recorded_students_are_the_paper_plans_kd_cells():
    assert sorted(train_layouts.kd_students(Path("/d"), Path("/w"))) == [
        ("kd", "agree", "plain"), ("kd", "none", "plain"), ("kd", "none", "true masks"), ("kd", "oracle", "plain"),
        ("kd", "ssim", "post-processed"), ("kd_refine", "agree", "refined"), ("kd_refine", "none", "refined"),
        ("wkd", "ssim", "plain"), ("wkd_refine", "ssim", "refined")]


def test_a_layout_check_passes_the_kernels_and_catches_a_wrong_gradient(monkeypatch):
    call = dict(student=dict(dtype="bfloat16", order=[0, 2, 3, 1]), teacher=dict(dtype="float32", order=[0, 1, 2, 3]),
                weight="none", temperature=1.0, window=3, gamma=1.0, map_temperature=4.0)
    row = train_layouts.check_call(call, (2, 2, 4, 8), torch.device("cpu"))
    assert row["ok"] and row["grad_layout_kept"]
    gradient = kernels.kd_triton.gradient
    monkeypatch.setattr(kernels.kd_triton, "gradient", lambda *args: gradient(*args) * 1.05)
    row = train_layouts.check_call(call, (2, 2, 4, 8), torch.device("cpu"))
    assert not row["ok"] and row["grad_over_bound"] > 1
