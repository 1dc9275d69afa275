"""The student stage end to end: every method trains and learns something different from the
others, the flags are checked, frozen nets get no gradient, and resume is exact."""
import itertools

import pytest
import torch
from conftest import run_script

import train_student
from data import Corruption, Geometry, Photometric, batch_indices, load_tensors, strengths, unlabeled_views
from engine.state import seed_stage
from nets import load_network
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


METHODS = {"supervised": [], "pseudo_label": ["--confidence", "0.5"], "mean_teacher": [], "kd": [],
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


def student_after(tiny_data, tiny_teacher, out, method, steps, *extra):
    run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", method, "--out", out,
               "--steps", steps, "--val-every", steps, "--width", 4, "--batch-size", 2, "--unlabeled-batch-size", 2,
               "--ramp-steps", 1, *extra)
    return torch.load(out, weights_only=True)["train_state"]["model"]


def test_a_kd_student_differs_from_its_control_only_in_the_unlabelled_term(tiny_data, tiny_teacher, tmp_path):
    """With lambda 0 the KD student trains bitwise as the supervised control of its seed: same start
    (the teacher), labelled batches, dropout draws, and BatchNorm statistics."""
    control = student_after(tiny_data, tiny_teacher, tmp_path / "s.pt", "supervised", 3)
    silent = student_after(tiny_data, tiny_teacher, tmp_path / "k.pt", "wkd", 3, "--lambda-max", 0)
    assert control.keys() == silent.keys()
    for key in control:
        assert torch.equal(control[key], silent[key]), key


def test_batchnorm_statistics_come_from_the_clean_labelled_images_only(tiny_data, tiny_teacher, tmp_path):
    """After one step from the same start, a KD student at full weight has the control's running
    statistics exactly: its unlabelled, noised pass normalised itself but updated none of them."""
    control = student_after(tiny_data, tiny_teacher, tmp_path / "s.pt", "supervised", 1)
    student = student_after(tiny_data, tiny_teacher, tmp_path / "k.pt", "kd", 1, "--lambda-max", 5)
    statistics = [k for k in control if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(control[k], student[k]) for k in statistics)
    weights = [k for k in control if k.endswith("weight")]
    assert any(not torch.equal(control[k], student[k]) for k in weights)    # the unlabelled term did act


def test_student_flags_are_checked(tiny_data, tiny_teacher, tmp_path):
    proc = run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--out", tmp_path / "s.pt",
                      check=False)
    assert proc.returncode == 2 and "--refiner" in proc.stderr
    proc = run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", "mean_teacher",
                      "--weight", "ssim", "--out", tmp_path / "s.pt", check=False)
    assert proc.returncode == 2 and "KD methods only" in proc.stderr
    proc = run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", "kd",
                      "--size", "64", "64", "--out", tmp_path / "s.pt", check=False)
    assert proc.returncode == 2 and "--size" in proc.stderr     # the size is the teacher's


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


def test_each_stage_draws_its_own_streams_and_students_share_theirs():
    inits, batches = {}, {}
    for stage in ("teacher", "student", "student"):
        seed = seed_stage(0, stage, False)
        inits.setdefault(stage, []).append(UNet(width=4).state_dict())
        batches.setdefault(stage, []).append(batch_indices(50, 8, seed, step=0))
    t, s = inits["teacher"][0], inits["student"]
    assert any(not torch.equal(t[k], s[0][k]) for k in t)
    assert all(torch.equal(s[0][k], s[1][k]) for k in t)
    assert not torch.equal(batches["teacher"][0], batches["student"][0])
    assert torch.equal(batches["student"][0], batches["student"][1])


def test_a_supervised_student_does_not_replay_its_teacher(tiny_data, tiny_teacher, tmp_path):
    out = tmp_path / "student.pt"
    run_script("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", "supervised",
               "--out", out, "--steps", 6, "--val-every", 3, "--width", 4, "--batch-size", 2, "--dropout", 0)
    teacher = torch.load(tiny_teacher, weights_only=True)["train_state"]["model"]
    student = torch.load(out, weights_only=True)["train_state"]["model"]
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher if teacher[k].is_floating_point())


class Recorder(torch.nn.Module):
    """A network that keeps every input it is given."""

    def __init__(self, net, inputs):
        super().__init__()
        self.net, self.inputs, self.config = net, inputs, net.config

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def test_the_teacher_sees_the_clean_view_and_the_student_a_noised_one(tiny_data, tiny_teacher, tmp_path,
                                                                      monkeypatch):
    teacher_inputs, student_inputs = [], []
    real_load = train_student.load_network

    def load_recorded(*args):
        net, ckpt = real_load(*args)
        return Recorder(net, teacher_inputs), ckpt
    monkeypatch.setattr(train_student, "load_network", load_recorded)
    monkeypatch.setattr(train_student, "UNet", lambda **config: Recorder(UNet(**config), student_inputs))
    monkeypatch.setattr(train_student.StageState, "save", lambda *args: None)
    train_student.main(["--data", str(tiny_data), "--teacher", str(tiny_teacher), "--method", "kd", "--out",
                        str(tmp_path / "s.pt"), "--steps", "1", "--width", "4", "--batch-size", "2",
                        "--unlabeled-batch-size", "3", "--device", "cpu", "--val-every", "5"])
    # the student's two passes: 2 labelled images, then the 3 unlabelled ones
    assert [len(x) for x in student_inputs[:2]] == [2, 3]        # then the validation
    clean, noised = teacher_inputs[0], student_inputs[1]
    s = train_student.StudentSettings()
    split = torch.load(tiny_teacher, weights_only=True)["split"]
    images, _ = load_tensors(tiny_data, split["unlabeled"], (32, 64), with_masks=False)
    expected_clean, expected_noised = unlabeled_views(
        images, 3, seed_stage(0, "student", False), 0, torch.device("cpu"), strengths(Geometry, s, "aug_"),
        strengths(Photometric, s, "strong_"), strengths(Corruption, s, "strong_"))
    torch.testing.assert_close(clean, expected_clean)          # the teacher: geometry only
    torch.testing.assert_close(noised, expected_noised)        # the student: the same geometry, then noise
    assert (noised - clean).abs().mean() > 0.02
