"""What is written beside every run: config.json (settings, code version, environment),
split.json, train.log, train.jsonl (every step's numbers) and curves.png, and the environment
record results carry."""
import fcntl
import hashlib
import json
import logging
import os
import platform
import secrets
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


def portable_command(argv) -> str:
    """The command line with every absolute path shown by its last part: a result that is shared
    then names no folder of this machine (folder names can carry a patient's or a site's)."""
    return " ".join(Path(a).name if os.path.isabs(a) else a for a in [Path(argv[0]).name, *argv[1:]])


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


def private_name(path: Path, suffix: str) -> Path:
    """A hidden name beside `path` that no other writer and no file of the user's has: this process's
    id and random digits, e.g. .teacher.pt.4242-9f3a1c.tmp."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}{suffix}")


def write_atomic(path, write) -> None:
    """`write(tmp)` into a private file beside `path`, then a rename onto it: a reader never sees half a
    file, a failure leaves none, two writers never share a temporary, and a write error is one line
    naming the file."""
    path = Path(path)
    tmp = private_name(path, ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def fill_folder(out: Path, write):
    """Return write(new) after it has made and filled the folder `new`, which then replaces `out`: a
    failure or an interruption leaves `out` as it was (in the instant between two renames, inside
    the private folder beside it) and no half-written folder. Both `new` and the replaced `out` live
    in a folder made here (`.<out>.<pid>-<random>.tmp`), so nothing of the user's and nothing of
    another run is touched."""
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".tmp", dir=out.parent))
    try:
        result = write(work / "new")
    except BaseException:
        shutil.rmtree(work)
        raise
    # a rename, not a deletion, so that an interruption cannot leave half of `out`
    if out.exists():
        out.rename(work / "old")
    (work / "new").rename(out)
    shutil.rmtree(work)
    return result


# ---------------------------------------------------------------------------------------------
# one run per output

_LOCKS: dict = {}      # output path -> the open lock file this process holds until it exits


def lock_output(path: Path, flag: str = "--out") -> None:
    """Make `path` this process's output until it exits: a second run writing it (in any process of
    this machine) is refused in one line while this one lives. The lock is the kernel's (flock) on a
    file in the temporary folder named by a hash of the path, so it ends with the process, however
    that ends, and leaves nothing beside the output."""
    path = Path(path).absolute()
    if path in _LOCKS:
        return
    folder = Path(tempfile.gettempdir()) / f"sinus-wkd-locks-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        lock = open(folder / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".lock"), "a+")
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot lock it against a second run ({err.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().split("\t")[0] or "?"
        lock.close()
        raise UserError(f"{flag} {path}: another run (process {holder}) is writing it; wait for it to end or "
                        f"choose another {flag}") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\t{path}\n")
    lock.flush()
    _LOCKS[path] = lock


def logs_folder(checkpoint: Path) -> Path:
    """`<stem>_logs/` beside a checkpoint: where everything about its run is written."""
    return Path(checkpoint).with_name(Path(checkpoint).stem + "_logs")


# what a run writes into its logs folder
RUN_RECORDS = ("config.json", "split.json", "train.log", "train.jsonl", "curves.png", "MODEL_CARD.md")


def clear_run_logs(checkpoint: Path) -> None:
    """Remove what an earlier run wrote into the logs folder of `checkpoint`, so that a run started
    afresh does not mix its records with another's (other files there are the user's and stay)."""
    for name in RUN_RECORDS:
        (logs_folder(checkpoint) / name).unlink(missing_ok=True)


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
    get a logger that writes nothing. A run that does not continue the checkpoint (--resume) starts
    by removing it and its records (the stage has refused to replace them unless --overwrite), so
    that no file of the old run is left beside the new run's."""
    logs = logs_folder(checkpoint)
    if not writer:
        silent = logging.getLogger("sinus-wkd-silent")
        silent.propagate = False
        silent.addHandler(logging.NullHandler())
        return logs, silent
    if not (settings.resume and Path(checkpoint).exists()):
        Path(checkpoint).unlink(missing_ok=True)
        clear_run_logs(checkpoint)
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
