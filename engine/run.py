"""Command-line plumbing every stage shares: common flags, device, seeding, output folder.

A run writes its checkpoint at `--out` and, in a folder beside it named `<stem>_logs/`,
the log file, `config.json` (flags, git hash, library versions) and `split.json`.
"""
import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import OneLineParser, UserError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "data"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def resolved_path(text: str) -> Path:
    """Paths that --resume compares are stored absolute, so `data` and `./data/` are one run."""
    return Path(text).resolve()


def base_parser(description: str, out: str, training: bool = True) -> argparse.ArgumentParser:
    p = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=resolved_path, default=DEFAULT_DATA,
                   help="dataset root with images/, masks/ and optional splits.json; the repo's data/ folder "
                        "gets the phantom dataset generated on first use")
    p.add_argument("--out", type=Path, default=Path(out),
                   help="checkpoint file to write (logs go to a folder beside it)" if training
                   else "folder to write the results to")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run; auto takes CUDA when available")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation, batches and augmentation")
    p.add_argument("--deterministic", action="store_true",
                   help="use deterministic algorithms only (bitwise repeatable on GPU, slower)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None if not training else (128, 256),
                   help="network input size, each side a multiple of 16; stages after the teacher take the "
                        "teacher's")
    if training:
        p.add_argument("--steps", type=positive_int, default=1000, help="training iterations")
        p.add_argument("--batch-size", type=positive_int, default=4, help="labelled images per step")
        p.add_argument("--lr", type=positive_float, default=1e-3,
                       help="peak learning rate of Adam (the schedule is in the description above)")
        p.add_argument("--val-every", type=positive_int, default=100,
                       help="validate and checkpoint every this many steps (and at the end)")
        p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="bf16 runs the networks under autocast; auto takes bf16 where the device computes it "
                            "natively (CUDA, or CPUs with AVX512-BF16/AMX), fp32 elsewhere")
        p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="keep activations in the channels-last memory format")
        p.add_argument("--resume", action="store_true",
                       help="continue the run stored at --out from its last checkpoint; the result equals an "
                            "uninterrupted run")
    return p


def select_device(flag: str) -> torch.device:
    if flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(flag)


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)   # private; absent means no
    return bool(check and check())


def autocast(args, device: torch.device):
    """The autocast context of --precision for the training forward passes."""
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_native(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def memory_format(args):
    return torch.channels_last if args.channels_last else torch.contiguous_format


def check_size(size, stride: int = 16) -> tuple:
    h, w = size
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise UserError(f"--size {h} {w}: both sides must be positive multiples of the network stride {stride}")
    return (h, w)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


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
                host=platform.node(), cpu=platform.processor() or platform.machine(), gpu=gpu,
                command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))


def writable_file(path: Path, flag: str = "--out") -> Path:
    """Fail early, before any work, if `path` cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot create its folder ({err.strerror})") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot be written; choose another path")
    return path


def writable_dir(path: Path, flag: str = "--out") -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot create the folder ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: folder is not writable; choose another path")
    return path


def log_dir_for(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + "_logs")


def write_json(path: Path, obj) -> None:
    """Atomic JSON write, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def start_logging(folder: Path, name: str = "train.log") -> logging.Logger:
    logger = logging.getLogger("sinus-wkd")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(folder / name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    return logger


def args_record(args) -> dict:
    """The flags as plain JSON-able values, as stored in checkpoints and config.json."""
    plain = lambda v: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {k: plain(v) for k, v in vars(args).items()}


def open_run_logs(checkpoint: Path, args, split: dict, extra: dict) -> tuple[Path, logging.Logger]:
    """The `<stem>_logs/` folder beside a checkpoint, with config.json and split.json written and
    train.log opened."""
    logs = log_dir_for(checkpoint)
    logs.mkdir(exist_ok=True)
    dump_run_config(logs, args, split, extra)
    return logs, start_logging(logs)


def dump_run_config(folder: Path, args, split: dict, extra: dict | None = None) -> None:
    config = dict(args=args_record(args),
                  environment=environment(), **(extra or {}))
    write_json(folder / "config.json", config)
    write_json(folder / "split.json", split)
