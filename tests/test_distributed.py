"""torchrun data parallelism on the CPU (gloo, two processes): the global batch is shared exactly,
so one step matches one process with twice the batch to float rounding; longer runs agree to a
stated tolerance; a killed two-process run resumes to the weights of an uninterrupted one; every
stage runs under torchrun."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, SCRIPT_ENV

TEACHER = ["--size", "32", "64", "--width", "4", "--labeled-ratio", "0.3", "--device", "cpu", "--precision", "fp32",
           "--no-channels-last"]


def command(processes: int, script: str, *args) -> list:
    # --standalone: a rendezvous on this machine at a free port, so tests never collide
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(processes)] if processes > 1 else [sys.executable]
    return [*launcher, str(REPO / script), *map(str, args)]


def train(processes: int, data, out, steps: int, batch: int, *extra):
    subprocess.run(command(processes, "train_teacher.py", "--data", data, "--out", out, "--steps", steps,
                           "--val-every", 2, "--batch-size", batch, *TEACHER, *extra),
                   env=SCRIPT_ENV, check=True, capture_output=True, timeout=600)
    return torch.load(out, weights_only=True)


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for k, v in state.items() if v.is_floating_point()])


def relative_difference(a: dict, b: dict) -> float:
    va, vb = flat(a), flat(b)
    return float((va - vb).norm() / va.norm())


def test_one_step_of_two_processes_is_one_process_with_twice_the_batch(tiny_data, tmp_path):
    one = train(1, tiny_data, tmp_path / "one.pt", 1, 4)
    two = train(2, tiny_data, tmp_path / "two.pt", 1, 2)
    # the same images, augmentations, BatchNorm statistics and loss: what differs is summation order
    assert relative_difference(one["train_state"]["model"], two["train_state"]["model"]) < 1e-4
    moments = [{str(i): s["exp_avg"] for i, s in ckpt["train_state"]["optimizer"]["state"].items()}
               for ckpt in (one, two)]
    assert relative_difference(*moments) < 1e-4
    config = (tmp_path / "two_logs" / "config.json").read_text()
    assert '"processes": 2' in config and '"global_batch": 4' in config


def test_two_processes_resume_exactly_and_stay_close_to_one_process(tiny_data, tmp_path):
    straight = train(2, tiny_data, tmp_path / "straight.pt", 6, 2)
    single = train(1, tiny_data, tmp_path / "single.pt", 6, 4)
    # Adam turns rounding-level differences of near-zero gradients into steps of the full learning
    # rate, so longer runs drift apart; 1 % of the weights' norm after six steps is the tolerance.
    assert relative_difference(straight["train_state"]["model"], single["train_state"]["model"]) < 1e-2

    out = tmp_path / "killed.pt"
    args = ["--data", tiny_data, "--out", out, "--steps", 6, "--val-every", 2, "--batch-size", 2, *TEACHER]
    proc = subprocess.Popen(command(2, "train_teacher.py", *args), env=SCRIPT_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while not out.exists() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if torch.load(out, weights_only=True)["step"] >= 6:
        pytest.fail("the run finished before it could be killed")
    subprocess.run(command(2, "train_teacher.py", *args, "--resume"), env=SCRIPT_ENV, check=True,
                   capture_output=True, timeout=600)
    resumed = torch.load(out, weights_only=True)
    for key, value in straight["train_state"]["model"].items():
        assert torch.equal(value, resumed["train_state"]["model"][key]), key


@pytest.mark.parametrize("script,extra", [("train_student.py", ["--method", "mean_teacher"]),
                                          ("train_cyclegan.py", ["--blocks", "1", "--disc-width", "4",
                                                                 "--pool-size", "3"])])
def test_later_stages_run_under_torchrun(tiny_data, tiny_teacher, tmp_path, script, extra):
    out = tmp_path / "out.pt"
    proc = subprocess.run(command(2, script, "--data", tiny_data, "--teacher", tiny_teacher, "--out", out,
                                  "--steps", 2, "--val-every", 2, "--batch-size", 2, "--width", 4, "--device", "cpu",
                                  *extra), env=SCRIPT_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.load(out, weights_only=True)["step"] == 2
    assert '"processes": 2' in (tmp_path / "out_logs" / "config.json").read_text()
