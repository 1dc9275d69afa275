"""End to end on a tiny phantom: teacher training, checkpoint contents, exact resume, evaluation."""
import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SCRIPT_ENV, TINY, assert_same_training, kill_then_resume, run_scripts


def test_teacher_checkpoint_holds_what_later_stages_need(tiny_teacher):
    ckpt = torch.load(tiny_teacher, weights_only=True)
    assert ckpt["kind"] == "teacher"
    assert ckpt["config"]["width"] == 4 and ckpt["size"] == [32, 64]
    assert set(ckpt["split"]) >= {"labeled", "unlabeled", "val", "test", "seed", "labeled_ratio"}
    assert ckpt["step"] == 6 and ckpt["train_state"]["step"] == 6
    assert {"model", "optimizer", "scheduler", "rng"} <= set(ckpt["train_state"])
    assert 0.0 <= ckpt["metrics"]["dice"] <= 1.0
    logs = tiny_teacher.with_name("teacher_logs")
    config = json.loads((logs / "config.json").read_text())
    assert config["args"]["steps"] == 6 and config["environment"]["git"]
    assert json.loads((logs / "split.json").read_text())["labeled"] == ckpt["split"]["labeled"]
    assert not list(tiny_teacher.parent.glob("*.tmp"))


def _train(data, out, *extra):
    return [sys.executable, str(REPO / "train_teacher.py"), "--data", str(data), "--out", str(out), "--steps", "24",
            "--val-every", "2", "--width", "4", "--batch-size", "2", "--labeled-ratio", "0.3", *TINY, *extra]


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_data, tmp_path):
    straight = tmp_path / "straight.pt"
    subprocess.run(_train(tiny_data, straight), env=SCRIPT_ENV, check=True, capture_output=True)
    resumed = kill_then_resume(_train(tiny_data, tmp_path / "resumed.pt"), tmp_path / "resumed.pt", 24)
    assert resumed["step"] == 24
    assert_same_training(torch.load(straight, weights_only=True), resumed, "model")


@pytest.fixture(scope="module")
def evaluations(tiny_data, tiny_teacher, tmp_path_factory):
    """evaluate.py, as a user runs it, on the test split ("test") and, one process for both, on the
    unlabelled split of a copy of the phantom whose first two unlabelled cases have no mask
    ("unlabeled"): {name: output folder}."""
    root = tmp_path_factory.mktemp("evaluations")
    data = root / "data"
    shutil.copytree(tiny_data, data)
    unlabeled = torch.load(tiny_teacher, weights_only=True)["split"]["unlabeled"]
    for case_id in unlabeled[:2]:                 # real unlabelled images usually have no mask
        (data / "masks" / f"{case_id}.png").unlink()
    out = {"test": root / "eval", "unlabeled": root / "eval_unlabeled"}
    run_scripts(("evaluate.py", "--data", tiny_data, "--ckpt", tiny_teacher, "--out", out["test"], "--spacing", "0.1"),
                ("evaluate.py", "--data", data, "--ckpt", tiny_teacher, "--split", "unlabeled", "--out",
                 out["unlabeled"], "--no-overlays"))
    return out


def test_evaluate_writes_metrics_summary_table_and_overlays(tiny_teacher, evaluations):
    out = evaluations["test"]
    ckpt = torch.load(tiny_teacher, weights_only=True)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["id"] for r in rows] == ckpt["split"]["test"]
    # scored at the original 64x128, not the 32x64 network size
    assert {(r["height"], r["width"]) for r in rows} == {("64", "128")}
    summary = json.loads((out / "summary.json").read_text())
    for metric in ("dice", "iou", "precision", "recall", "hd", "hd95", "hd95_pooled", "assd"):
        stats = summary["metrics"][metric]
        assert stats["n"] == len(rows) and stats["n_undefined"] <= len(rows)
    dice = [float(r["dice"]) for r in rows]
    assert abs(summary["metrics"]["dice"]["mean"] - sum(dice) / len(dice)) < 1e-9
    assert summary["meta"]["spacing_mm"] == [0.1, 0.1]
    assert "| dice |" in (out / "table.md").read_text()
    assert len(list((out / "overlays").glob("*.png"))) == len(rows)
    assert not out.with_name("eval.tmp").exists()


def test_evaluate_scores_only_cases_that_have_masks(tiny_teacher, evaluations):
    unlabeled = torch.load(tiny_teacher, weights_only=True)["split"]["unlabeled"]
    out = evaluations["unlabeled"]
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["unscored_without_mask"] == unlabeled[:2]
    assert meta["ids"] == unlabeled[2:] and meta["n"] == len(unlabeled) - 2
    assert not (out / "overlays").exists()
