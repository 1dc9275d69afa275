"""Outputs are never overwritten, mixed or deleted by accident: a finished checkpoint or result folder
is replaced only with --overwrite, a partial run only continued with --resume (or replaced); one
run at a time writes an output; temporaries never collide with a user's names; evaluation's default
folder names its split."""
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SCRIPT_ENV, TINY, run_main
from test_cli_errors import assert_one_line_error

from reproduction.plan import Run
from reproduction.schedule import stage_argv

TEACHER = ["--steps", 2, "--val-every", 2, "--width", 4, "--batch-size", 2, "--labeled-ratio", 0.3, *TINY]


def unfinished_copy(ckpt_path, out, step=1):
    """`ckpt_path` as a run stopped at `step` would have left it."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    torch.save(dict(ckpt, finished=False, step=step), out)
    return out


def test_a_finished_checkpoint_is_replaced_only_with_overwrite(tiny_data, tmp_path):
    out = tmp_path / "teacher.pt"
    assert run_main("train_teacher.py", "--data", tiny_data, "--out", out, *TEACHER).returncode == 0
    first = out.read_bytes()
    (out.with_name("teacher_logs") / "notes.txt").write_text("mine")
    proc = run_main("train_teacher.py", "--data", tiny_data, "--out", out, *TEACHER)
    assert_one_line_error(proc, f"--out {out}: holds a finished teacher (step 2)", "--overwrite")
    assert out.read_bytes() == first

    again = run_main("train_teacher.py", "--data", tiny_data, "--out", out, *TEACHER, "--overwrite", "--lr", 0.01)
    assert again.returncode == 0, again.stderr
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["finished"] and ckpt["args"]["lr"] == 0.01
    log = (out.with_name("teacher_logs") / "train.log").read_text()
    assert log.count("teacher: ") == 1                               # the old run's log is gone, not appended to
    assert (out.with_name("teacher_logs") / "notes.txt").read_text() == "mine"   # the user's file stays


def test_an_interrupted_run_is_continued_only_with_resume(tiny_data, tiny_teacher, tmp_path):
    out = unfinished_copy(tiny_teacher, tmp_path / "teacher.pt")
    args = ["--data", tiny_data, "--out", out, "--steps", 6, "--val-every", 3, "--width", 4, "--batch-size", 2,
            "--labeled-ratio", 0.3, *TINY]
    proc = run_main("train_teacher.py", *args)
    assert_one_line_error(proc, "holds an unfinished teacher run (stopped at step 1 of 6)", "--resume", "--overwrite")
    assert torch.load(out, weights_only=True)["step"] == 1
    proc = run_main("train_teacher.py", *args, "--resume", "--overwrite")
    assert_one_line_error(proc, "--resume and --overwrite: choose one")
    foreign = tmp_path / "notes.pt"
    foreign.write_text("not a checkpoint")
    proc = run_main("train_teacher.py", *args[:2], "--out", foreign, *args[4:])
    assert_one_line_error(proc, "holds a file that is no checkpoint", "--overwrite")


def holding_lock(path):
    """A process that holds the lock of the output `path` until it is killed."""
    code = f"from engine.records import lock_output; lock_output({str(path)!r}); print('held', flush=True); input()"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=SCRIPT_ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_one_output_is_refused_while_the_first_runs(tiny_data, tiny_teacher, tmp_path):
    out, images = tmp_path / "teacher.pt", tiny_data / "images"
    first = holding_lock(out)
    try:
        proc = run_main("train_teacher.py", "--data", tiny_data, "--out", out, *TEACHER)
        assert_one_line_error(proc, f"--out {out}: another run (process {first.pid}) is writing it")
        assert not out.exists() and not out.with_name("teacher_logs").exists()
    finally:
        first.kill()
        first.wait()
    proc = run_main("train_teacher.py", "--data", tiny_data, "--out", out, *TEACHER)   # the lock ended with it
    assert proc.returncode == 0, proc.stderr

    predicted = tmp_path / "predicted"
    first = holding_lock(predicted)
    try:
        proc = run_main("predict.py", "--ckpt", tiny_teacher, "--images", images, "--out", predicted)
        assert_one_line_error(proc, f"--out {predicted}: another run (process {first.pid}) is writing it")
        assert not predicted.exists()
    finally:
        first.kill()
        first.wait()


def test_result_folders_are_replaced_only_with_overwrite_and_leave_a_users_tmp_alone(tiny_data, tiny_teacher,
                                                                                      tmp_path):
    images = tiny_data / "images"
    out = tmp_path / "predicted"
    for folder in (tmp_path / "predicted.tmp", tmp_path / "teacher_test_eval.tmp"):   # the user's own
        folder.mkdir()
        (folder / "mine.txt").write_text("mine")
    assert run_main("predict.py", "--ckpt", tiny_teacher, "--images", images, "--out", out,
                    "--no-overlays").returncode == 0
    proc = run_main("predict.py", "--ckpt", tiny_teacher, "--images", images, "--out", out)
    assert_one_line_error(proc, f"--out {out}: holds the results of an earlier run", "--overwrite")
    assert not (out / "overlays").exists()
    assert run_main("predict.py", "--ckpt", tiny_teacher, "--images", images, "--out", out,
                    "--overwrite").returncode == 0
    assert (out / "overlays").is_dir()

    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(tiny_teacher.read_bytes())
    for split in ("test", "val"):           # evaluate's default folder names its split
        proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", ckpt, "--split", split, "--no-overlays")
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "teacher_test_eval/summary.json").is_file() and (tmp_path / "teacher_val_eval").is_dir()
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", ckpt)
    assert_one_line_error(proc, "teacher_test_eval: holds the results of an earlier run", "--overwrite")
    for folder in ("predicted.tmp", "teacher_test_eval.tmp"):
        assert (tmp_path / folder / "mine.txt").read_text() == "mine"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temporary left


def test_a_folder_named_like_a_temporary_beside_a_checkpoint_is_no_obstacle(tiny_data, tmp_path):
    out = tmp_path / "teacher.pt"
    (tmp_path / "teacher.pt.tmp").mkdir()
    (tmp_path / "teacher_logs").mkdir()
    (tmp_path / "teacher_logs" / "train.jsonl.tmp").mkdir()
    proc = run_main("train_teacher.py", "--data", tiny_data, "--out", out, *TEACHER)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and (tmp_path / "teacher.pt.tmp").is_dir()


def test_reproduce_resumes_training_and_redoes_evaluations_explicitly(tmp_path):
    checkpoint, folder = tmp_path / "teacher.pt", tmp_path / "teacher_test_eval"
    train = Run("t", "train_teacher", ["--out", checkpoint], checkpoint, 0, 4)
    score = Run("e", "evaluate", ["--out", folder], folder, 0)
    assert stage_argv(train, "cpu")[-1] == "cpu" and stage_argv(score, "cpu")[-1] == "cpu"
    checkpoint.write_text("x")
    folder.mkdir()
    assert stage_argv(train, "cpu")[-1] == "--resume"
    assert stage_argv(score, "cpu")[-1] == "--overwrite"


@pytest.mark.parametrize("stage", ["export", "predict"])
def test_an_existing_export_or_an_unfinished_network_is_refused(tiny_teacher, tiny_data, tmp_path, stage):
    onnx = tmp_path / "t.onnx"
    if stage == "export":
        assert run_main("export.py", "--ckpt", tiny_teacher, "--out", onnx).returncode == 0
        assert_one_line_error(run_main("export.py", "--ckpt", tiny_teacher, "--out", onnx), "exists", "--overwrite")
        assert run_main("export.py", "--ckpt", tiny_teacher, "--out", onnx, "--overwrite").returncode == 0
    cut = unfinished_copy(tiny_teacher, tmp_path / "cut.pt")
    argv = ["export.py", "--ckpt", cut, "--out", tmp_path / "cut.onnx"] if stage == "export" else \
        ["predict.py", "--ckpt", cut, "--images", tiny_data / "images", "--out", tmp_path / "p"]
    assert_one_line_error(run_main(*argv), f"--ckpt {cut}: its training did not finish (stopped at step 1 of 6)",
                          "--resume")
