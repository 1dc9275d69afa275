"""Every training stage's step loop leaves train.jsonl (each step's losses and wall time, each
validation's numbers) and curves.png of them in its logs folder, whatever keys the stage logs; a
resumed run's record is that of an uninterrupted one, wall times aside."""
import json
import logging
import math

import imageio.v3 as iio
import pytest
import torch

from engine.curves import panels
from engine.loop import NonFiniteLoss, finite_values, run_steps
from errors import UserError


def fake_stage(ckpt, steps, start=0, fail_at=None, val=lambda step: {"dice": step / 100}):
    """run_steps with a student's keys (sup, unsup and lambda) and deterministic values."""
    done = []

    def train_step(step):
        if step == fail_at:
            raise NonFiniteLoss("unlabelled loss")
        return {"sup": 1 / (step + 1), "unsup": 0.5 / (step + 1), "lambda": min(step / 5, 1.0)}

    run_steps(desc="student", steps=steps, start_step=start, val_every=3, train_step=train_step,
              validate=lambda: val(len(done)), save=lambda step, metrics: done.append(step), checkpoint_path=ckpt,
              logger=logging.getLogger("test-curves"))
    return done


def entries(logs, times=False):
    """train.jsonl's lines; with `times`, the wall-time lines too."""
    lines = [json.loads(line) for line in (logs / "train.jsonl").read_text().splitlines()]
    return [e for e in lines if times or "time" not in e]


def test_the_loop_writes_every_step_and_validation_and_their_curves(tmp_path):
    ckpt = tmp_path / "student.pt"
    fake_stage(ckpt, steps=7)
    logs = tmp_path / "student_logs"
    lines = entries(logs)
    assert [e["step"] for e in lines if "train" in e] == list(range(1, 8))
    assert [(e["step"], e["val"]) for e in lines if "val" in e] == [(3, {"dice": 0.0}), (6, {"dice": 0.01}),
                                                                    (7, {"dice": 0.02})]
    assert lines[0]["train"] == {"sup": 1.0, "unsup": 0.5, "lambda": 0.0}
    times = [e for e in entries(logs, times=True) if "time" in e]
    assert [e["step"] for e in times] == list(range(1, 8)) and all(e["time"]["step_s"] > 0 for e in times)
    picture = iio.imread(logs / "curves.png")
    assert picture.shape[:2] == (3 * 240, 800)       # losses, lambda, validation dice
    assert picture[..., :3].std() > 10                 # something is drawn


def test_the_panels_follow_whatever_keys_a_stage_logs():
    student = [{"step": 1, "train": {"sup": 1.0, "unsup": 0.4, "lambda": 0.1}}, {"step": 1, "val": {"dice": 0.5}}]
    assert [(title, sorted(group)) for title, group, _ in panels(student)] == [
        ("training losses", ["sup", "unsup"]), ("lambda (weight of the unlabelled loss)", ["lambda"]),
        ("validation dice", ["dice"])]
    refiner = [{"step": 1, "train": {"g": 3.0, "d": 0.25, "cycle": 0.1}},
               {"step": 1, "val": {"teacher_dice": 0.7, "teacher_hd95": 5.0, "refined_dice": 0.71,
                                   "refined_hd95": 4.9, "dice_gain": 0.01, "gain": 0.01}}]
    assert [(title, sorted(group)) for title, group, _ in panels(refiner)] == [
        ("training losses", ["cycle", "d", "g"]), ("validation dice", ["refined_dice", "teacher_dice"]),
        ("validation hd95", ["refined_hd95", "teacher_hd95"]), ("validation gain", ["dice_gain", "gain"])]


def test_a_resumed_run_records_what_an_uninterrupted_one_does(tmp_path):
    for name in ("whole", "cut"):
        (tmp_path / name).mkdir()
    fake_stage(tmp_path / "whole" / "s.pt", steps=10)

    def killed(step):   # interrupted after the checkpoint of step 6, two steps into the next stretch
        if step == 2:
            raise KeyboardInterrupt
        return {"dice": step / 100}

    with pytest.raises(KeyboardInterrupt):
        fake_stage(tmp_path / "cut" / "s.pt", steps=10, val=killed)
    assert max(e["step"] for e in entries(tmp_path / "cut" / "s_logs")) == 9
    fake_stage(tmp_path / "cut" / "s.pt", steps=10, start=6, val=lambda n: {"dice": (n + 2) / 100})
    assert entries(tmp_path / "cut" / "s_logs") == entries(tmp_path / "whole" / "s_logs")


def test_a_non_finite_loss_leaves_the_curves_up_to_it(tmp_path):
    with pytest.raises(UserError, match="non-finite unlabelled loss at step 4"):
        fake_stage(tmp_path / "s.pt", steps=10, fail_at=4)
    assert [e["step"] for e in entries(tmp_path / "s_logs") if "train" in e] == [1, 2, 3, 4]
    assert (tmp_path / "s_logs" / "curves.png").is_file()


def test_the_loss_check_names_the_first_loss_that_is_not_finite():
    assert finite_values({"sup": torch.tensor(1.5), "unsup": torch.tensor(0.25, dtype=torch.bfloat16)}) == {
        "sup": 1.5, "unsup": 0.25}
    with pytest.raises(NonFiniteLoss) as stop:
        finite_values({"sup": torch.tensor(1.0), "unsup": torch.tensor(float("inf")), "other": torch.tensor(math.nan)})
    assert stop.value.name == "unsup"


def test_a_training_stage_leaves_its_record_and_curves(tiny_teacher):
    logs = tiny_teacher.with_name("teacher_logs")
    lines = entries(logs)
    assert [e["step"] for e in lines if "train" in e] == [1, 2, 3, 4, 5, 6]
    assert [sorted(e["val"]) for e in lines if "val" in e] == [["dice"], ["dice"]]
    assert iio.imread(logs / "curves.png").shape[:2] == (2 * 240, 800)
