"""Provenance checked: a checkpoint says whether its training finished, and a later stage refuses an
unfinished one in one line; a refiner and a student record their teacher by the content of its
weights, and a teacher retrained in place (same seed, split and size) is told from the one they
learnt from."""
import pytest
import torch
from conftest import run_main
from test_cli_errors import assert_one_line_error
from test_outputs_guarded import unfinished_copy

from engine.state import check_same_experiment, load_checkpoint
from errors import UserError

REFINER = ["--width", 4, "--blocks", 1, "--disc-width", 4, "--disc-layers", 1, "--batch-size", 2, "--steps", 2,
           "--val-every", 2]
STUDENT = ["--width", 4, "--batch-size", 2, "--unlabeled-batch-size", 2, "--steps", 2, "--val-every", 2,
           "--ramp-steps", 1]


@pytest.fixture(scope="module")
def chain(tiny_data, tiny_teacher, tmp_path_factory):
    """A refiner and a student of tiny_teacher, and a copy of the teacher with other weights (as a
    teacher retrained in place with the same seed has): {name: path}."""
    folder = tmp_path_factory.mktemp("chain")
    paths = dict(teacher=tiny_teacher, refiner=folder / "cyclegan.pt", student=folder / "student.pt",
                 retrained=folder / "retrained.pt")
    assert run_main("train_cyclegan.py", "--data", tiny_data, "--teacher", tiny_teacher, "--out", paths["refiner"],
                    *REFINER).returncode == 0
    assert run_main("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--out", paths["student"],
                    "--method", "kd", *STUDENT).returncode == 0
    ckpt = torch.load(tiny_teacher, weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] + 1e-3
    torch.save(ckpt, paths["retrained"])
    return paths


def test_every_stage_records_whether_it_finished_and_whom_it_learnt_from(chain):
    from engine.state import weights_sha256
    teacher = torch.load(chain["teacher"], weights_only=True)
    for kind in ("refiner", "student"):
        ckpt = torch.load(chain[kind], weights_only=True)
        assert ckpt["finished"] is True and ckpt["teacher_sha256"] == weights_sha256(teacher["model"])
    assert teacher["finished"] is True


def test_an_unfinished_teacher_is_refused_by_every_later_stage(tiny_data, chain, tmp_path):
    cut = unfinished_copy(chain["teacher"], tmp_path / "cut.pt", step=3)
    message = f"--teacher {cut}: its training did not finish (stopped at step 3 of 6)"
    assert_one_line_error(run_main("train_cyclegan.py", "--data", tiny_data, "--teacher", cut, "--out",
                                   tmp_path / "c.pt", *REFINER), message, "--resume")
    assert_one_line_error(run_main("train_student.py", "--data", tiny_data, "--teacher", cut, "--out",
                                   tmp_path / "s.pt", "--method", "kd", *STUDENT), message)
    assert_one_line_error(run_main("evaluate.py", "--data", tiny_data, "--ckpt", cut, "--out", tmp_path / "e"),
                          f"--ckpt {cut}: its training did not finish")
    refiner = unfinished_copy(chain["refiner"], tmp_path / "cyclegan.pt")
    assert_one_line_error(run_main("train_student.py", "--data", tiny_data, "--teacher", chain["teacher"],
                                   "--refiner", refiner, "--out", tmp_path / "s.pt", *STUDENT),
                          f"--refiner {refiner}: its training did not finish")
    assert not any((tmp_path / name).exists() for name in ("c.pt", "s.pt", "e"))


def test_a_refiner_of_a_teacher_retrained_in_place_is_refused(tiny_data, chain, tmp_path):
    retrained = load_checkpoint(chain["retrained"], ("teacher",), "--teacher")
    assert retrained["split"] == load_checkpoint(chain["teacher"], ("teacher",), "--teacher")["split"]
    with pytest.raises(UserError, match="was trained from another teacher .*retrained in place"):
        check_same_experiment(load_checkpoint(chain["refiner"], ("cyclegan",), "--refiner"), "--refiner",
                              chain["refiner"], retrained)
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", chain["retrained"], "--refiner",
                    chain["refiner"], "--out", tmp_path / "s.pt", *STUDENT)
    assert_one_line_error(proc, f"--refiner {chain['refiner']} was trained from another teacher")
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", chain["retrained"], "--refiner", chain["refiner"],
                    "--split", "unlabeled", "--out", tmp_path / "e")
    assert_one_line_error(proc, "was trained from another teacher")


def test_a_run_resumes_only_with_the_teacher_it_started_with(tiny_data, chain, tmp_path):
    """A student stopped part-way whose teacher file was then retrained in place."""
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(chain["retrained"].read_bytes())
    student = torch.load(chain["student"], weights_only=True)
    cut = tmp_path / "student.pt"
    torch.save(dict(student, finished=False, step=1, args=dict(student["args"], teacher=str(teacher))), cut)
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", teacher, "--out", cut, "--method", "kd",
                    *STUDENT, "--resume")
    assert_one_line_error(proc, f"--teacher {teacher}: not the teacher the run at --out", "started with")
    assert torch.load(cut, weights_only=True)["step"] == 1
