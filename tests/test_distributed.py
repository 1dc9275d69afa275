"""torchrun data parallelism on the CPU (gloo, two processes): the global batch is shared exactly,
so one step matches one process with twice the batch to float rounding; longer runs agree to a
stated tolerance; a two-process run resumed part-way ends with the weights of an uninterrupted one;
every stage runs under torchrun."""
import sys

import pytest
import torch
from conftest import resumed, run_scripts

TEACHER = ["--size", "32", "64", "--width", "4", "--labeled-ratio", "0.3", "--device", "cpu", "--precision", "fp32",
           "--no-channels-last", "--steps", "6", "--val-every", "1"]
RESUME_AT = 2


def torchrun(processes: int) -> list:
    # --standalone: a rendezvous on this machine at a free port, so tests never collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for k, v in state.items() if v.is_floating_point()])


def relative_difference(a: dict, b: dict) -> float:
    va, vb = flat(a), flat(b)
    return float((va - vb).norm() / va.norm())


def teacher_args(data, batch: int) -> list:
    return ["--data", data, "--batch-size", batch, *TEACHER]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Six steps of one process at batch 4 and of two processes at batch 2 each, with the
    checkpoints of step 1 (both) and of step 2 (two processes) kept: {name: checkpoint path}."""
    folder = tmp_path_factory.mktemp("distributed")
    paths = {name: folder / f"{name}.pt" for name in ("one", "one@1", "two", "two@1", "two@2")}
    run_scripts(("train_teacher.py", *teacher_args(tiny_data, 4), "--out", paths["one"]),
                snapshots={paths["one"]: {1: paths["one@1"]}})
    run_scripts(("train_teacher.py", *teacher_args(tiny_data, 2), "--out", paths["two"]), launcher=torchrun(2),
                snapshots={paths["two"]: {1: paths["two@1"], RESUME_AT: paths["two@2"]}})
    return paths


def test_one_step_of_two_processes_is_one_process_with_twice_the_batch(runs):
    one, two = (torch.load(runs[name], weights_only=True) for name in ("one@1", "two@1"))
    assert one["step"] == two["step"] == 1
    # the same images, augmentations, BatchNorm statistics and loss: what differs is summation order
    assert relative_difference(one["train_state"]["model"], two["train_state"]["model"]) < 1e-4
    moments = [{str(i): s["exp_avg"] for i, s in ckpt["train_state"]["optimizer"]["state"].items()}
               for ckpt in (one, two)]
    assert relative_difference(*moments) < 1e-4
    config = (runs["two"].with_name("two_logs") / "config.json").read_text()
    assert '"processes": 2' in config and '"global_batch": 4' in config


def test_two_processes_resume_exactly_and_stay_close_to_one_process(tiny_data, runs):
    straight, single = (torch.load(runs[name], weights_only=True) for name in ("two", "one"))
    # Adam turns rounding-level differences of near-zero gradients into steps of the full learning
    # rate, so longer runs drift apart; 1 % of the weights' norm after six steps is the tolerance.
    assert relative_difference(straight["train_state"]["model"], single["train_state"]["model"]) < 1e-2
    # from the checkpoint of step 2 (the file a run killed then leaves; a real kill is checked on
    # the one-process teacher), two processes resume to the uninterrupted run's weights
    again = resumed("train_teacher.py", runs["two@2"], *teacher_args(tiny_data, 2), launcher=torchrun(2))
    assert again["step"] == 6
    for key, value in straight["train_state"]["model"].items():
        assert torch.equal(value, again["train_state"]["model"][key]), key


@pytest.mark.parametrize("script,extra", [("train_student.py", ["--method", "mean_teacher"]),
                                          ("train_cyclegan.py", ["--blocks", "1", "--disc-width", "4",
                                                                 "--pool-size", "3"])])
def test_later_stages_run_under_torchrun(tiny_data, tiny_teacher, tmp_path, script, extra):
    out = tmp_path / "out.pt"
    run_scripts((script, "--data", tiny_data, "--teacher", tiny_teacher, "--out", out, "--steps", 2, "--val-every", 2,
                 "--batch-size", 2, "--width", 4, "--device", "cpu", *extra), launcher=torchrun(2))
    assert torch.load(out, weights_only=True)["step"] == 2
    assert '"processes": 2' in (tmp_path / "out_logs" / "config.json").read_text()
