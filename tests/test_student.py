"""The student stage end to end: every method trains and learns something different from the
others, the flags are checked, frozen nets get no gradient, and resume is exact."""
import itertools

import pytest
import torch
from conftest import RESUME_AT, assert_same_training, resumed, run_main, run_scripts, script_state, student_args

import train_cyclegan
import train_student
from data import Corruption, Geometry, Photometric, batch_indices, load_tensors, strengths, unlabeled_views
from engine.networks import load_network
from engine.state import seed_stage
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


METHODS = ("supervised", "pseudo_label", "mean_teacher", "kd", "wkd")


@pytest.fixture(scope="module")
def students(tiny_students):
    """{method: checkpoint} after three steps of each method from the same teacher and seed."""
    return {method: torch.load(tiny_students[method], weights_only=True) for method in METHODS}


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


def weights_of(tiny_students, name):
    return torch.load(tiny_students[name], weights_only=True)["train_state"]["model"]


def test_a_kd_student_differs_from_its_control_only_in_the_unlabelled_term(tiny_students):
    """With lambda 0 the KD student trains bitwise as the supervised control of its seed: same start
    (the teacher), labelled batches, dropout draws, and BatchNorm statistics."""
    control, silent = weights_of(tiny_students, "supervised"), weights_of(tiny_students, "wkd_silent")
    assert control.keys() == silent.keys()
    for key in control:
        assert torch.equal(control[key], silent[key]), key


def test_batchnorm_statistics_come_from_the_clean_labelled_images_only(tiny_students):
    """After one step from the same start, a KD student at full weight has the control's running
    statistics exactly: its unlabelled, noised pass normalised itself but updated none of them."""
    control, student = weights_of(tiny_students, "supervised_1"), weights_of(tiny_students, "kd_1")
    statistics = [k for k in control if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(control[k], student[k]) for k in statistics)
    weights = [k for k in control if k.endswith("weight")]
    assert any(not torch.equal(control[k], student[k]) for k in weights)    # the unlabelled term did act


def test_student_flags_are_checked(tiny_data, tiny_teacher, tmp_path):
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--out", tmp_path / "s.pt")
    assert proc.returncode == 2 and "--refiner" in proc.stderr
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", "mean_teacher",
                    "--weight", "ssim", "--out", tmp_path / "s.pt")
    assert proc.returncode == 2 and "KD methods only" in proc.stderr
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", "kd",
                    "--size", "64", "64", "--out", tmp_path / "s.pt")
    assert proc.returncode == 2 and "--size" in proc.stderr     # the size is the teacher's
    assert not (tmp_path / "s.pt").exists()


def test_student_resume_equals_an_uninterrupted_run(tiny_data, tiny_teacher, tiny_students):
    """From the checkpoint wkd_6 wrote at step 2 (the file a run killed then leaves; a real kill is
    checked on the teacher), a resumed run ends where the uninterrupted one did."""
    straight = torch.load(tiny_students["wkd_6"], weights_only=True)
    assert torch.load(tiny_students["wkd_6@2"], weights_only=True)["step"] == RESUME_AT < straight["step"]
    again = resumed("train_student.py", tiny_students["wkd_6@2"], *student_args(tiny_data, tiny_teacher, "wkd_6"))
    assert again["step"] == 6
    assert_same_training(straight, again, "model")


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


def test_a_supervised_student_does_not_replay_its_teacher(tiny_teacher, tiny_students):
    teacher = torch.load(tiny_teacher, weights_only=True)["train_state"]["model"]
    student = torch.load(tiny_students["supervised_no_dropout"], weights_only=True)["train_state"]["model"]
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
    with script_state():        # the plain torch KD loss, as a user's run takes
        train_student.main(["--data", str(tiny_data), "--teacher", str(tiny_teacher), "--method", "kd", "--out",
                            str(tmp_path / "s.pt"), "--steps", "1", "--width", "4", "--batch-size", "2",
                            "--unlabeled-batch-size", "3", "--device", "cpu", "--val-every", "5"])
    # the student's two passes: 2 labelled images, then the 3 unlabelled ones
    assert [len(x) for x in student_inputs[:2]] == [2, 3]        # then the validation
    clean, noised = teacher_inputs[0], student_inputs[1]
    teacher = torch.load(tiny_teacher, weights_only=True)
    s, split = train_student.StudentSettings(**train_student.inherited(teacher)), teacher["split"]
    images, _ = load_tensors(tiny_data, split["unlabeled"], (32, 64), with_masks=False)
    expected_clean, expected_noised, no_masks = unlabeled_views(
        images, 3, seed_stage(0, "student", False), 0, torch.device("cpu"), strengths(Geometry, s, "aug_"),
        strengths(Photometric, s, "strong_"), strengths(Corruption, s, "strong_"))
    assert no_masks is None
    torch.testing.assert_close(clean, expected_clean)          # the teacher: geometry only
    torch.testing.assert_close(noised, expected_noised)        # the student: the same geometry, then noise
    assert (noised - clean).abs().mean() > 0.02


def test_a_gated_refiner_that_failed_its_rule_leaves_the_targets_bit_for_bit_the_teachers(tiny_data, tiny_teacher,
                                                                                          tmp_path):
    """With --refiner-gate, a refiner that failed its keep rule is not applied at all (no logit round
    trip): the student equals the unrefined one of its seed, weight for weight. One that passed is
    applied: the student equals the ungated refined one and differs from the unrefined one."""
    refiner, passed = tmp_path / "cyclegan.pt", tmp_path / "cyclegan_passed.pt"
    with script_state():        # two steps: this process, not a fresh one, trains the refiner
        train_cyclegan.main([str(a) for a in ("--data", tiny_data, "--teacher", tiny_teacher, "--out", refiner,
                                              "--width", 4, "--blocks", 1, "--disc-width", 4, "--disc-layers", 1,
                                              "--batch-size", 2, "--steps", 2, "--val-every", 2)])
    ckpt = torch.load(refiner, weights_only=True)
    assert not ckpt["metrics"]["passes"]          # a teacher this tiny finds no sinus: no gain to pass
    torch.save(dict(ckpt, metrics=dict(ckpt["metrics"], passes=1.0)), passed)
    runs = {"plain": ("wkd", []), "gated": ("wkd_refine", ["--refiner", refiner, "--refiner-gate"]),
            "refined": ("wkd_refine", ["--refiner", refiner]),
            "passed": ("wkd_refine", ["--refiner", passed, "--refiner-gate"])}
    run_scripts(*(("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", method, *flags,
                   "--width", 4, "--batch-size", 2, "--unlabeled-batch-size", 2, "--steps", 3, "--val-every", 3,
                   "--ramp-steps", 1, "--lambda-max", 5, "--out", tmp_path / f"{name}.pt")
                  for name, (method, flags) in runs.items()))
    weights = {name: torch.load(tmp_path / f"{name}.pt", weights_only=True)["model"] for name in runs}

    def same(a, b):
        return all(torch.equal(v, weights[b][k]) for k, v in weights[a].items())
    assert same("gated", "plain") and same("passed", "refined") and not same("refined", "plain")
