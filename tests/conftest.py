import os
import subprocess
import sys
from pathlib import Path

# The kernel tests run the Triton code through its CPU interpreter, which Triton only enables
# for kernels decorated after this is set: it must precede any import of `kernels`.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Stage scripts run as a user runs them: a fresh process on the plain torch paths. One thread:
# on these tiny inputs OpenMP's synchronisation costs more than a second core gives, and on a
# busy machine two spinning threads per process slow it down tenfold.
SCRIPT_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
SCRIPT_ENV["OMP_NUM_THREADS"] = "1"
TINY = ["--size", "32", "64"]


def run_script(script: str, *args, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a top-level script; with `check`, fail the test showing its stderr if it fails."""
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=SCRIPT_ENV,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


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
