"""What is written beside every run: config.json (settings, code version, environment),
split.json, train.log, train.jsonl (every step's numbers) and curves.png, and the environment
record results carry."""
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from errors import UserError

from .cli import REPO, settings_json


def cpu_model() -> str:
    """The CPU's model name as `lscpu` reports it (else /proc/cpuinfo, else platform)."""
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_hash() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else "unknown"


def environment() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(git=git_hash(), python=platform.python_version(), torch=torch.__version__, triton=triton_version,
                cpu=cpu_model(), threads=torch.get_num_threads(), gpu=gpu,
                command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))


def write_atomic(path, write) -> None:
    """`write(tmp)` into a file beside `path`, then a rename onto it: a reader never sees half a file,
    a failure leaves none, and a write error is one line naming the file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if not tmp.is_dir():    # a folder of that name was there before and is not ours to remove
            tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def fill_folder(out: Path, write):
    """Return write(tmp) after it has filled `tmp`, a sibling folder that then replaces `out`: a failure
    or an interruption leaves `out` as it was (in the instant between two renames, inside a fresh
    `<out>.old-*` folder beside it) and no half-written folder."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # a rename, not a deletion, so that an interruption cannot leave half of `out`; into a folder
    # made here, so that nothing of the user's beside `out` is touched
    old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
    if out.exists():
        out.rename(old / out.name)
    tmp.rename(out)
    shutil.rmtree(old)
    return result


def logs_folder(checkpoint: Path) -> Path:
    """`<stem>_logs/` beside a checkpoint: where everything about its run is written."""
    return Path(checkpoint).with_name(Path(checkpoint).stem + "_logs")


class StepLog:
    """train.jsonl in a logs folder: one JSON object a line, `{"step": n, "train": {name: value}}`
    after each training step and `{"step": n, "val": {name: value}}` after each validation, n the
    number of steps done. A run resumed at `start_step` first drops the lines after it (steps
    that were redone), so that the file describes the run as if it had never stopped."""

    def __init__(self, logs: Path, start_step: int):
        self.path = Path(logs) / "train.jsonl"
        self.entries = [e for e in self._read() if e["step"] <= start_step] if start_step else []
        self.path.parent.mkdir(exist_ok=True)
        write_text(self.path, "".join(json.dumps(e) + "\n" for e in self.entries))
        self.file = open(self.path, "a")

    def _read(self) -> list:
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:   # the last line of a killed run may be cut short
                break
        return entries

    def add(self, step: int, kind: str, values: dict) -> None:
        entry = {"step": step, kind: {k: float(v) for k, v in values.items()}}
        self.entries.append(entry)
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def open_run_logs(checkpoint: Path, settings, split: dict, extra: dict, writer: bool = True):
    """`<stem>_logs/` beside a checkpoint, with config.json (settings, environment) and split.json
    written and train.log opened, by the `writer` alone (rank 0 of several processes); the others
    get a logger that writes nothing."""
    logs = logs_folder(checkpoint)
    if not writer:
        silent = logging.getLogger("sinus-wkd-silent")
        silent.propagate = False
        silent.addHandler(logging.NullHandler())
        return logs, silent
    logs.mkdir(exist_ok=True)
    write_json(logs / "config.json", dict(args=settings_json(settings), environment=environment(), **extra))
    write_json(logs / "split.json", split)
    logger = logging.getLogger("sinus-wkd")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(logs / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    return logs, logger
