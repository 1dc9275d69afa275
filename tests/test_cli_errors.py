"""SPEC section 9 at the command line: one line on stderr naming the flag or file, exit status 2,
no traceback, and nothing half-written. One check runs a script as a user does, in a fresh
process; the others call its main() here (an uncaught exception would fail them as the traceback
a user would see)."""
import pytest
import torch
from conftest import TINY, run_main, run_script


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_missing_data_folder(tmp_path):
    """In a fresh process, as a user sees it; the other checks call the scripts' main() in this one."""
    proc = run_script("train_teacher.py", "--data", tmp_path / "nope", "--out", tmp_path / "t.pt", check=False)
    assert_one_line_error(proc, "--data", "nope")


def test_size_not_divisible_by_the_stride(tiny_data, tmp_path):
    proc = run_main("train_teacher.py", "--data", tiny_data, "--out", tmp_path / "t.pt", "--size", "30", "64")
    assert_one_line_error(proc, "--size 30 64")


def test_unwritable_output(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_main("train_teacher.py", "--data", tiny_data, "--out", blocker / "t.pt", *TINY)
    assert_one_line_error(proc, "--out")


def test_cuda_requested_without_a_gpu(tiny_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_main("train_teacher.py", "--data", tiny_data, "--out", tmp_path / "t.pt", "--device", "cuda")
    assert_one_line_error(proc, "--device cuda")


def test_checkpoint_of_the_wrong_kind(tiny_data, tiny_teacher, tmp_path):
    fake = tmp_path / "cyclegan.pt"
    torch.save(dict(kind="cyclegan"), fake)
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", fake, "--method", "kd",
                      "--out", tmp_path / "s.pt")
    assert_one_line_error(proc, "--teacher", "cyclegan", "teacher checkpoint")
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", fake)
    assert_one_line_error(proc, "--ckpt", "cyclegan")


def test_corrupt_checkpoint(tiny_data, tmp_path):
    broken = tmp_path / "teacher.pt"
    broken.write_bytes(b"not a checkpoint")
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", broken, "--out", tmp_path / "e")
    assert_one_line_error(proc, "--ckpt", "not a readable checkpoint")
    assert not (tmp_path / "e").exists()


def test_later_stages_take_the_labeled_ratio_from_the_teacher(tiny_data, tiny_teacher, tmp_path):
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", "kd",
                      "--labeled-ratio", "0.5", "--out", tmp_path / "s.pt")
    assert_one_line_error(proc, "unrecognized arguments: --labeled-ratio 0.5")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "t.pt"
    # An absurd learning rate drives the weights, then the loss, to Inf/NaN within a few steps.
    proc = run_main("train_teacher.py", "--data", tiny_data, "--out", out, "--steps", "60", "--val-every", "1",
                      "--lr", "1e30", "--width", "4", "--labeled-ratio", "0.3", *TINY)
    assert_one_line_error(proc, "non-finite loss at step")
    step = int(proc.stderr.split("at step ")[1].split(":")[0])
    ckpt = torch.load(out, weights_only=True)
    # steps count from 0, a checkpoint's step is the number done: all of them before the bad one
    assert 0 < ckpt["step"] <= step and f"(step {ckpt['step']}) is kept" in proc.stderr
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not out.with_name("t.pt.tmp").exists()


def test_bad_numbers_are_one_line_errors(tiny_data, tmp_path):
    proc = run_main("train_teacher.py", "--data", tiny_data, "--out", tmp_path / "t.pt", "--steps", "0")
    assert_one_line_error(proc, "--steps 0: must be in [1, inf)")


def test_evaluate_never_replaces_a_folder_it_did_not_write(tiny_data, tiny_teacher, tmp_path):
    keep = tmp_path / "runs"
    keep.mkdir()
    (keep / "precious.pt").write_text("x")
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", tiny_teacher, "--out", keep)
    assert_one_line_error(proc, "--out", "choose a new folder")
    assert (keep / "precious.pt").exists()


def test_evaluate_has_no_size_of_its_own(tiny_data, tiny_teacher, tmp_path):
    # the input size is the checkpoint's: later stages have no --size to contradict it
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", tiny_teacher, "--size", "64", "128",
                    "--out", tmp_path / "e")
    assert_one_line_error(proc, "--size")
    assert not (tmp_path / "e").exists()


def test_splits_json_and_labeled_ratio_conflict(tiny_data, tiny_teacher, tmp_path):
    import json
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    split = torch.load(tiny_teacher, weights_only=True)["split"]
    fixed = {k: split[k] for k in ("labeled", "unlabeled", "val", "test")}
    (data / "splits.json").write_text(json.dumps(fixed))
    proc = run_main("train_teacher.py", "--data", data, "--out", tmp_path / "t.pt", "--labeled-ratio", "0.5",
                      *TINY)
    assert_one_line_error(proc, "--labeled-ratio 0.5", "splits.json")
    # a later stage on data whose splits.json disagrees with the teacher's split
    fixed["val"], fixed["test"] = fixed["test"], fixed["val"]
    (data / "splits.json").write_text(json.dumps(fixed))
    proc = run_main("evaluate.py", "--data", data, "--ckpt", tiny_teacher, "--out", tmp_path / "e")
    assert_one_line_error(proc, "splits.json", "differs")


@pytest.mark.parametrize("field,value,message", [("args", None, "incomplete teacher checkpoint (no args)"),
                                                 ("size", "abc", "malformed teacher checkpoint (size)"),
                                                 ("split", dict(val=[]), "malformed teacher checkpoint (split)")])
def test_a_checkpoint_missing_or_mangling_a_field_is_a_one_line_error(tiny_data, tiny_teacher, tmp_path, field,
                                                                       value, message):
    ckpt = torch.load(tiny_teacher, weights_only=True)
    if value is None:
        del ckpt[field]
    else:
        ckpt[field] = value
    odd = tmp_path / "teacher.pt"
    torch.save(ckpt, odd)
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", odd, "--out", tmp_path / "e")
    assert_one_line_error(proc, "--ckpt", message)


def test_an_out_folder_that_is_a_file_or_holds_other_files_is_refused(tiny_data, tiny_teacher, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("x")
    for out, message in (("a_file", "is a file; name a folder"), ("theirs", "holds more than this script writes")):
        proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", tiny_teacher, "--out", tmp_path / out)
        assert_one_line_error(proc, "--out", message)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "x" and (tmp_path / "a_file").read_text() == "x"


def test_incompatible_network_config_is_a_one_line_error(tiny_data, tiny_teacher, tmp_path):
    ckpt = torch.load(tiny_teacher, weights_only=True)
    ckpt["config"] = dict(ckpt["config"], width=8)          # weights of width 4 no longer fit
    odd = tmp_path / "teacher.pt"
    torch.save(ckpt, odd)
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", odd, "--out", tmp_path / "e")
    assert_one_line_error(proc, "--ckpt", "does not fit")
