"""The student stage: every method runs, the schedule and EMA are right, frozen nets get no gradient."""
import math

import pytest
import torch
from conftest import run_script

from engine.frozen import load_teacher
from kernels import weighted_kd_loss
from nets.unet import UNet
from train_student import ema_update, pseudo_label_loss, ramp


def test_ramp_follows_the_sigmoid_shaped_schedule():
    assert ramp(0, 2.0, 100) == pytest.approx(2.0 * math.exp(-5.0))
    assert ramp(50, 2.0, 100) == pytest.approx(2.0 * math.exp(-1.25))
    assert ramp(100, 2.0, 100) == 2.0 and ramp(1000, 2.0, 100) == 2.0
    values = [ramp(s, 1.0, 100) for s in range(101)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_ema_update_moves_toward_the_model_at_the_set_decay():
    torch.manual_seed(0)
    model, ema = UNet(width=2), UNet(width=2)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, step=1000, decay=0.99)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.99 * b + 0.01 * p)
    ema_update(ema, model, step=0, decay=0.99)      # warm-up: the first update copies the model
    for e, p in zip(ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, p)


def test_pseudo_label_loss_uses_confident_pixels_only():
    teacher = torch.tensor([[[[5.0, 0.0]], [[0.0, 0.1]]]])      # pixel 0 confident class 0, pixel 1 not
    student = torch.tensor([[[[0.0, 3.0]], [[1.0, 0.0]]]])
    expected = torch.nn.functional.cross_entropy(student[..., :1], torch.tensor([[[0]]]))
    torch.testing.assert_close(pseudo_label_loss(student, teacher, 0.9), expected)


def test_frozen_teacher_gets_no_gradient(tiny_teacher):
    teacher, _ = load_teacher(tiny_teacher, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = UNet(width=4)
    x = torch.rand(2, 1, 32, 64)
    loss = weighted_kd_loss(student(x), teacher(x), weight="ssim", backend="torch")
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("method,extra", [("supervised", []), ("pseudo_label", []), ("mean_teacher", []),
                                          ("kd", []), ("wkd", ["--weight", "agree", "--temperature", "2"])])
def test_each_method_trains_and_writes_a_student_checkpoint(tiny_data, tiny_teacher, tmp_path, method, extra):
    out = tmp_path / "student.pt"
    run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", method, "--out", out,
               "--steps", 3, "--val-every", 3, "--width", 4, "--batch-size", 2, "--unlabeled-batch-size", 2,
               "--ramp-steps", 2, *extra)
    ckpt = torch.load(out, weights_only=False)
    teacher = torch.load(tiny_teacher, weights_only=False)
    assert ckpt["kind"] == "student" and ckpt["method"] == method and ckpt["step"] == 3
    assert ckpt["split"] == teacher["split"] and ckpt["size"] == teacher["size"]
    assert ("ema" in ckpt["train_state"]) == (method == "mean_teacher")
    if method == "wkd":
        assert ckpt["weight"] == "agree"


def test_student_flags_are_checked(tiny_data, tiny_teacher, tmp_path):
    proc = run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--out", tmp_path / "s.pt",
                      check=False)
    assert proc.returncode == 2 and "--refiner" in proc.stderr
    proc = run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", "mean_teacher",
                      "--weight", "ssim", "--out", tmp_path / "s.pt", check=False)
    assert proc.returncode == 2 and "KD methods only" in proc.stderr
    proc = run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", "kd",
                      "--size", "64", "64", "--out", tmp_path / "s.pt", check=False)
    assert proc.returncode == 2 and "--size 64 64" in proc.stderr


def test_student_resume_after_a_kill_equals_an_uninterrupted_run(tiny_data, tiny_teacher, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, SCRIPT_ENV

    def command(out, *extra):
        return [sys.executable, str(REPO / "train_student.py"), "--data", str(tiny_data), "--teacher",
                str(tiny_teacher), "--method", "wkd", "--out", str(out), "--steps", "16", "--val-every", "2",
                "--width", "4", "--batch-size", "2", "--unlabeled-batch-size", "2", "--ramp-steps", "4", *extra]

    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    subprocess.run(command(straight), env=SCRIPT_ENV, check=True, capture_output=True)
    proc = subprocess.Popen(command(resumed), env=SCRIPT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not resumed.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(resumed, weights_only=False)["step"] < 16, "the run finished before it could be interrupted"
    subprocess.run(command(resumed, "--resume"), env=SCRIPT_ENV, check=True, capture_output=True)
    a, b = torch.load(straight, weights_only=False), torch.load(resumed, weights_only=False)
    for key, value in a["train_state"]["model"].items():
        assert torch.equal(value, b["train_state"]["model"][key]), key
    assert a["metrics"] == b["metrics"] and b["step"] == 16
