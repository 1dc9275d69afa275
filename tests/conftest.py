import contextlib
import importlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

# The kernel tests run the Triton code through its CPU interpreter, which Triton only enables
# for kernels decorated after this is set: it must precede any import of `kernels`.
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Stage scripts run as a user runs them: a fresh process on the plain torch paths. One thread:
# on these tiny inputs OpenMP's synchronisation costs more than a second core gives, and on a
# busy machine two spinning threads per process slow it down tenfold.
SCRIPT_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
SCRIPT_ENV["OMP_NUM_THREADS"] = "1"
# The same in this process, where some tests train in place: the known-answer refiner's 300 steps
# took 499 s with two threads on the busy 2-core machine, 36 s with one.
torch.set_num_threads(1)
TINY = ["--size", "32", "64"]
RUNNER = REPO / "tests" / "stage_runner.py"


def run_script(script: str, *args, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a top-level script; with `check`, fail the test showing its stderr if it fails."""
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=SCRIPT_ENV,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def module_of(script: str) -> str:
    """train_teacher.py -> train_teacher, data/phantom.py -> data.phantom"""
    return script.removesuffix(".py").replace("/", ".")


def run_scripts(*calls, snapshots: dict | None = None, launcher: list | None = None) -> subprocess.CompletedProcess:
    """Run several scripts, each `(script, *args)`, one after another in one fresh process (one
    import of torch for all of them, as in a worker of reproduce.py); fail the test if one fails.
    `snapshots` {checkpoint: {step: copy}} copies a run's checkpoint as it was written at `step`."""
    plan = [[module_of(script), [str(a) for a in args]] for script, *args in calls]
    copies = {str(path): {str(step): str(copy) for step, copy in steps.items()}
              for path, steps in (snapshots or {}).items()}
    proc = subprocess.run([*(launcher or [sys.executable]), str(RUNNER), json.dumps(plan), json.dumps(copies)],
                          cwd=REPO, env=SCRIPT_ENV, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{[c[0] for c in plan]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    for copy in (c for steps in copies.values() for c in steps.values()):
        assert Path(copy).is_file(), f"no checkpoint was written at the step of {copy}"
    return proc


@contextlib.contextmanager
def script_state():
    """What a stage script sees in a fresh process, for the time of a call in this one: the plain
    torch kernels (not the Triton interpreter this suite switches on), one thread; and afterwards
    the global state it changes (random generators, threads, deterministic mode, the environment,
    its logger, sys.argv) as it was."""
    import kernels.dispatch
    saved = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                 threads=torch.get_num_threads(), deterministic=torch.are_deterministic_algorithms_enabled(),
                 environ=dict(os.environ), argv=list(sys.argv), interpret=kernels.dispatch.INTERPRET,
                 handlers=list(logging.getLogger("sinus-wkd").handlers))
    kernels.dispatch.INTERPRET = False
    torch.set_num_threads(1)
    try:
        yield
    finally:
        kernels.dispatch.INTERPRET = saved["interpret"]
        random.setstate(saved["python"])
        np.random.set_state(saved["numpy"])
        torch.set_rng_state(saved["torch"])
        torch.set_num_threads(saved["threads"])
        if torch.are_deterministic_algorithms_enabled() != saved["deterministic"]:
            torch.use_deterministic_algorithms(saved["deterministic"])
        os.environ.clear()
        os.environ.update(saved["environ"])
        sys.argv[:] = saved["argv"]
        logger = logging.getLogger("sinus-wkd")
        for handler in logger.handlers:
            if handler not in saved["handlers"]:
                handler.close()
        logger.handlers[:] = saved["handlers"]


def run_main(script: str, *args) -> subprocess.CompletedProcess:
    """Call a script's main(argv) in this process, for checks of its argument and file errors and
    fast paths (a fresh process costs seconds for importing torch): its exit status, stdout and
    stderr as run_script gives them. An exception other than SystemExit fails the test as the
    traceback a user would see."""
    main = importlib.import_module(module_of(script)).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    with script_state(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as stop:      # as the interpreter reports it: sys.exit("text") prints the text
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


def kill_then_resume(command: list, out: Path, steps: int) -> dict:
    """Start `command`, a `steps`-step training run writing the checkpoint `out`; SIGKILL it (its whole
    process group) as soon as its first checkpoint exists; check it was cut short; run it again
    with --resume and return the checkpoint the resumed run ends with."""
    proc = subprocess.Popen(command, env=SCRIPT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while not out.exists() and proc.poll() is None:
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):       # it may have ended on its own: checked below
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.exists(), "the run left no checkpoint"
    assert torch.load(out, weights_only=True)["step"] < steps, "the run finished before it could be killed"
    subprocess.run([*command, "--resume"], env=SCRIPT_ENV, check=True, capture_output=True, timeout=600)
    return torch.load(out, weights_only=True)


def resumed(script: str, snapshot: Path, *args, launcher: list | None = None) -> dict:
    """Resume a run from `snapshot`, the checkpoint run_scripts copied part-way (what a run killed
    then leaves), with the run's own `args` but --out `snapshot`; return the final checkpoint."""
    run_scripts((script, *args, "--out", snapshot, "--resume"), launcher=launcher)
    return torch.load(snapshot, weights_only=True)


def assert_same_training(a: dict, b: dict, *states: str) -> None:
    """Two checkpoints of one run trained alike: same step, the same kept weights, metrics and
    training `states` (entries of train_state holding weights), bit for bit."""
    assert a["step"] == b["step"] and a["metrics"].keys() == b["metrics"].keys()
    for key, value in a["metrics"].items():      # NaN where a tiny network finds no boundary
        assert value == b["metrics"][key] or value != value and b["metrics"][key] != b["metrics"][key], key
    pairs = [("model", a["model"], b["model"])] + [(n, a["train_state"][n], b["train_state"][n]) for n in states]
    for name, wa, wb in pairs:
        assert wa.keys() == wb.keys(), name
        for key, value in wa.items():
            assert torch.equal(value, wb[key]), (name, key)


def evaluation(cells, seed, values):
    """A results.json entry (reproduce.py's) of an evaluation whose per-case Dice are `values`."""
    values = np.asarray(values, dtype=float)
    stats_of = dict(mean=float(values.mean()), std=float(values.std()), median=float(np.median(values)),
                    n=len(values), n_undefined=0)
    return dict(script="evaluate", seed=seed, cells=cells, wall_s=1.0, metrics=dict(dice=stats_of),
                cases=dict(id=[f"c{i}" for i in range(len(values))], dice=list(values)))


def claim_results(shift):
    """Six seeds of the claims' rows: kd and kd_refine at the control, wkd and wkd_refine `shift` above it."""
    runs, values = {}, {"supervised": 0.0, "kd": 0.0, "kd_refine": 0.0, "wkd": shift, "wkd_refine": shift}
    for seed in range(6):
        noise = 0.001 * (seed % 3)
        for row, offset in values.items():
            runs[f"{row}{seed}"] = evaluation([["table1", row]], seed, [0.7 + offset + noise + 0.01 * i for i in range(4)])
            for metric in ("hd95", "assd"):     # distances that grow with the Dice here: worse, not better
                runs[f"{row}{seed}"]["metrics"][metric] = runs[f"{row}{seed}"]["metrics"]["dice"]
                runs[f"{row}{seed}"]["cases"][metric] = runs[f"{row}{seed}"]["cases"]["dice"]
    return {"runs": runs, "precision": "fp32", "threads_per_run": 1,
            "environment": {"cpu": "a CPU", "torch": "2.13"}}


@pytest.fixture
def opened(monkeypatch) -> list:
    """(path, purpose) of every file the data code decodes from now on: its pixels, or only its
    format (data.dataset's PIXELS or FORMAT_CHECK)."""
    import data.dataset
    paths = []
    decode = data.dataset.decode

    def recording(path, what, purpose=data.dataset.PIXELS):
        paths.append((Path(path), purpose))
        return decode(path, what, purpose)
    monkeypatch.setattr(data.dataset, "decode", recording)
    return paths


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small phantom dataset shared by the end-to-end tests."""
    from data.phantom import generate
    root = tmp_path_factory.mktemp("phantom")
    generate(root, n=30, size=(64, 128), seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    run_script("train_teacher.py", "--data", tiny_data, "--out", out, "--steps", 6, "--val-every", 3,
               "--width", 4, "--batch-size", 2, "--labeled-ratio", 0.3, *TINY)
    return out


STUDENT = ["--width", 4, "--batch-size", 2, "--unlabeled-batch-size", 2]
# The students the end-to-end tests read, {name: (method, flags)}, trained from tiny_teacher in one
# process: three steps of each method (the same seed, so the same labelled batches); a wkd
# student whose unlabelled term is off; one step of the control and of a KD student at full
# weight; a supervised student without dropout; a longer wkd run whose step-2 checkpoint is kept
# for the resume check; two steps of each modern baseline.
THREE = ["--steps", 3, "--val-every", 3, "--ramp-steps", 2]
ONE = ["--steps", 1, "--val-every", 1, "--ramp-steps", 1]
STUDENT_RUNS = {
    "supervised": ("supervised", THREE), "pseudo_label": ("pseudo_label", [*THREE, "--confidence", 0.5]),
    "mean_teacher": ("mean_teacher", THREE), "kd": ("kd", THREE),
    "wkd": ("wkd", [*THREE, "--weight", "agree", "--temperature", 2]),
    "wkd_silent": ("wkd", [*THREE, "--lambda-max", 0]),
    "supervised_1": ("supervised", ONE), "kd_1": ("kd", [*ONE, "--lambda-max", 5]),
    "supervised_no_dropout": ("supervised", ["--steps", 6, "--val-every", 3, "--dropout", 0]),
    "wkd_6": ("wkd", ["--steps", 6, "--val-every", 2, "--ramp-steps", 4]),
    **{m: (m, ["--steps", 2, "--val-every", 2, "--ramp-steps", 1, "--confidence", 0.5]) for m in ("bcp", "unimatch")},
}
RESUME_AT = 2       # the step of wkd_6 a resumed run starts from


def student_args(tiny_data, tiny_teacher, name: str) -> list:
    method, flags = STUDENT_RUNS[name]
    return ["--data", tiny_data, "--teacher", tiny_teacher, "--method", method, *STUDENT, *flags]


@pytest.fixture(scope="session")
def tiny_students(tiny_data, tiny_teacher, tmp_path_factory) -> dict:
    """{name: checkpoint path} of every run of STUDENT_RUNS, plus "wkd_6@2": wkd_6 at step RESUME_AT."""
    folder = tmp_path_factory.mktemp("students")
    paths = {name: folder / f"{name}.pt" for name in STUDENT_RUNS}
    paths["wkd_6@2"] = folder / f"wkd_6_at{RESUME_AT}.pt"
    run_scripts(*(("train_student.py", *student_args(tiny_data, tiny_teacher, name), "--out", paths[name])
                  for name in STUDENT_RUNS), snapshots={paths["wkd_6"]: {RESUME_AT: paths["wkd_6@2"]}})
    return paths


@pytest.fixture(scope="session")
def micro_reproduction(tmp_path_factory) -> tuple:
    """reproduce.py's micro profile run once, with two CPU workers, on a two-class phantom (left and
    right sinus), for every check of a whole reproduction: (data, output folder, its stdout)."""
    from data.phantom import generate
    root = tmp_path_factory.mktemp("micro")
    generate(root / "data", n=20, size=(32, 64), seed=4, classes=2)
    proc = run_script("reproduce.py", "--profile", "micro", "--data", root / "data", "--out", root / "out",
                      "--devices", "cpu,cpu")
    return root / "data", root / "out", proc.stdout
