"""The student stage end to end: every method trains and learns something different from the
others, the flags are checked, frozen nets get no gradient, and resume is exact."""
import itertools

import pytest
import torch
from conftest import run_script

from engine.state import load_network
from kernels import weighted_kd_loss
from nets.unet import UNet


def test_frozen_teacher_gets_no_gradient(tiny_teacher):
    teacher, _ = load_network(tiny_teacher, ("teacher",), "--teacher", torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = UNet(width=4)
    x = torch.rand(2, 1, 32, 64)
    loss = weighted_kd_loss(student(x), teacher(x), weight="ssim", backend="torch")
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


METHODS = {"supervised": [], "pseudo_label": [], "mean_teacher": [], "kd": [],
           "wkd": ["--weight", "agree", "--temperature", "2"]}


@pytest.fixture(scope="module")
def students(tiny_data, tiny_teacher, tmp_path_factory):
    """{method: checkpoint} after three steps of each method from the same teacher and seed."""
    folder = tmp_path_factory.mktemp("students")
    for method, extra in METHODS.items():
        run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", method,
                   "--out", folder / f"{method}.pt", "--steps", 3, "--val-every", 3, "--width", 4, "--batch-size", 2,
                   "--unlabeled-batch-size", 2, "--ramp-steps", 2, *extra)
    return {method: torch.load(folder / f"{method}.pt", weights_only=True) for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_a_student_checkpoint(students, tiny_teacher, method):
    ckpt, teacher = students[method], torch.load(tiny_teacher, weights_only=True)
    assert ckpt["kind"] == "student" and ckpt["method"] == method and ckpt["step"] == 3
    assert ckpt["split"] == teacher["split"] and ckpt["size"] == teacher["size"]
    assert ("ema" in ckpt["train_state"]) == (method == "mean_teacher")
    if method == "wkd":
        assert ckpt["weight"] == "agree"


def test_each_method_learns_something_different(students):
    """Same seed, same labelled batches: only the unlabelled objective differs, and so must the weights."""
    for a, b in itertools.combinations(METHODS, 2):
        wa, wb = students[a]["train_state"]["model"], students[b]["train_state"]["model"]
        assert any(not torch.equal(wa[k], wb[k]) for k in wa), f"{a} and {b} trained the same weights"


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
    assert torch.load(resumed, weights_only=True)["step"] < 16, "the run finished before it could be interrupted"
    subprocess.run(command(resumed, "--resume"), env=SCRIPT_ENV, check=True, capture_output=True)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    for key, value in a["train_state"]["model"].items():
        assert torch.equal(value, b["train_state"]["model"][key]), key
    assert a["metrics"] == b["metrics"] and b["step"] == 16
