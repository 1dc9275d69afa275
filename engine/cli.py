"""Command line and devices: each script's settings are one dataclass, its flags are built from it.

A setting is a dataclass field made by `setting(default, help, within=..., choices=...)`. The
field name gives the flag (`ema_decay` -> `--ema-decay`), its type the parsing, and `within` an
interval such as "(0, 1]" that every value is checked against, so a script's defaults, help
and ranges all sit in one visible block at its top.
"""
import argparse
import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path

import torch

from errors import OneLineParser, UserError

REPO = Path(__file__).resolve().parent.parent


def setting(default, help: str, *, within: str | None = None, choices=None, metavar=None, required=False):
    """A dataclass field that becomes a command-line flag; `within` is an interval like "[0, 1)"."""
    return dataclasses.field(default=default, metadata=dict(help=help, within=within, choices=choices,
                                                            metavar=metavar, required=required))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _interval(text: str):
    match = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", text)
    if not match:
        raise ValueError(f"bad interval {text!r}")
    left, lo, hi, right = match.groups()
    return float(lo), float(hi), left == "[", right == "]"


def _outside(value: float, within: str) -> bool:
    lo, hi, closed_lo, closed_hi = _interval(within)
    if not math.isfinite(value):
        return True
    return value < lo or value > hi or (value == lo and not closed_lo) or (value == hi and not closed_hi)


def _parts(annotation):
    """(base type, number of values or None, optional) of a settings field's annotation."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return args[0], ("+" if args[-1] is Ellipsis else len(args)), optional
    return annotation, None, optional


def _shown(default) -> str:
    if default is None:
        return ""
    if isinstance(default, Path) and default.is_relative_to(REPO):
        default = f"{default.relative_to(REPO)}/ in the repository"
    return "; default: " + (" ".join(map(str, default)) if isinstance(default, tuple) else str(default))


def build_parser(settings_class, description: str) -> argparse.ArgumentParser:
    """One flag per field of `settings_class`, with its help, default and choices."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(settings_class)
    for field in dataclasses.fields(settings_class):
        meta, default = field.metadata, field.default
        base, nargs, _ = _parts(hints[field.name])
        help_text = meta["help"] + (f" (in {meta['within']})" if meta["within"] else "")
        if base is bool:
            parser.add_argument(flag_name(field.name), action=argparse.BooleanOptionalAction, default=default,
                                help=help_text + f"; default: {'on' if default else 'off'}")
            continue
        parser.add_argument(flag_name(field.name), type=base, nargs=nargs, default=default,
                            choices=meta["choices"], metavar=meta["metavar"], required=meta["required"],
                            help=help_text + ("; required" if meta["required"] else _shown(default)))
    return parser


def parse(settings_class, description: str, argv=None):
    """The settings of one run from `argv`; a value outside its interval is a one-line error."""
    namespace = build_parser(settings_class, description).parse_args(argv)
    settings = settings_class(**{k: _normal(v) for k, v in vars(namespace).items()})
    for field in dataclasses.fields(settings):
        within, value = field.metadata["within"], getattr(settings, field.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if within and value is not None and any(_outside(float(v), within) for v in numbers):
            shown = " ".join(map(str, numbers))
            raise UserError(f"{flag_name(field.name)} {shown}: must be in {within}")
    return settings


def _normal(value):
    """Lists become tuples; paths become absolute, so `--data data` and `--data ./data/` name one run."""
    if isinstance(value, list):
        return tuple(value)
    return value.resolve() if isinstance(value, Path) else value


def settings_json(settings) -> dict:
    """The settings as plain JSON values, as stored in checkpoints and config.json."""
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        return list(value) if isinstance(value, tuple) else value
    return {k: plain(v) for k, v in dataclasses.asdict(settings).items()}


# ---------------------------------------------------------------------------------------------
# devices and numerics

def check_device(name: str, flag: str, auto: bool = True) -> None:
    """A one-line UserError naming `flag` unless `name` is cpu, cuda, an existing cuda:N (or auto)."""
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?" if auto else r"cpu|cuda(?::(\d+))?", name)
    if not match:
        raise UserError(f"{flag}: {name!r} is not a device; use {'auto, ' if auto else ''}cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{flag}: no CUDA device is available; use cpu")
    if match.group(1) and int(match.group(1)) >= torch.cuda.device_count():
        raise UserError(f"{flag}: {name} does not exist; this machine has {torch.cuda.device_count()} GPUs")


def select_device(flag: str) -> torch.device:
    """The device of --device; a GPU becomes the process's current CUDA device before anything else
    uses CUDA, since what launches without naming a device (Triton kernels, the random streams of
    `torch.cuda`) goes to the current one, cuda:0 unless set. Under torchrun (WORLD_SIZE above 1)
    each process takes the GPU of its local rank."""
    check_device(flag, f"--device {flag}")
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(flag)
    if device.type != "cuda":
        return device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    elif device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def training_backends(device: torch.device, deterministic: bool) -> None:
    """On CUDA, cuDNN times the algorithms of each convolution shape on its first call and keeps the
    fastest (a stage's shapes are fixed, so this is paid once); not with --deterministic, where a
    timing could pick another algorithm, and so another rounding, in another run."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)   # private; absent means no
    return bool(check and check())


def autocast(precision: str, device: torch.device):
    """The autocast context of --precision for the training forward passes."""
    bf16 = precision == "bf16" or (precision == "auto" and bf16_native(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def check_size(size, stride: int) -> tuple:
    h, w = size
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise UserError(f"--size {h} {w}: both sides must be positive multiples of the network stride {stride}")
    return (h, w)


# ---------------------------------------------------------------------------------------------
# output paths: checked before any work is done

def writable_file(path: Path, flag: str = "--out") -> Path:
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


def output_folder(path: Path, written: set, overwrite: bool, flag: str = "--out") -> Path:
    """A folder a script fills with the entries `written`: a new one, or with `overwrite` one it filled
    before, never a folder that holds anything else (it is replaced as a whole, see
    records.fill_folder)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file; name a folder")
    if path.exists() and not {p.name for p in path.iterdir()} <= written:
        raise UserError(f"{flag} {path}: exists and holds more than this script writes; choose a new folder")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path}: holds the results of an earlier run; replace them with --overwrite, or "
                        f"choose another {flag}")
    writable_dir(path.parent, flag)
    return path


def pixel_spacing(values, flag: str = "--spacing") -> tuple:
    """(row, column) pixel size in mm from one or two values."""
    if len(values) not in (1, 2):
        raise UserError(f"{flag} {' '.join(map(str, values))}: give one or two numbers (mm per pixel)")
    return (values[0], values[-1])
