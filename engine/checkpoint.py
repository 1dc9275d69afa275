"""Full-state checkpoints, written atomically, and checked for their kind when read.

A checkpoint is one file holding what downstream stages need (`kind`, `config`, the best
weights `model`, the resolved `split`, `metrics`, `code_version`) and what `--resume` needs
(`train_state`: current weights, optimizer, scheduler, step, RNG states, best-so-far).
"""
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .run import args_record

KINDS = ("teacher", "cyclegan", "student")


def save_checkpoint(path, state: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {path}: {err.strerror or err}") from None


def load_checkpoint(path, kinds, flag: str) -> dict:
    """Read a checkpoint given on the command line as `flag`; it must be of one of `kinds`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"{flag} {path}: not a readable checkpoint ({type(err).__name__})") from None
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in kinds:
        want = " or ".join(kinds)
        raise UserError(f"{flag} {path}: is a {kind or 'foreign'} checkpoint, expected a {want} checkpoint")
    missing = [k for k in ("config", "model", "split", "size", "train_state") if k not in state]
    if missing:
        raise UserError(f"{flag} {path}: incomplete {kind} checkpoint (no {', '.join(missing)}); retrain it")
    return state


def rebuild(cls, ckpt: dict, flag: str, path, config: dict | None = None) -> torch.nn.Module:
    """The network `cls` of a checkpoint, with its best weights; a config or weights that do not
    fit this code are a one-line error, not a traceback."""
    try:
        net = cls(**(config or ckpt["config"]))
        net.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"{flag} {path}: its network does not fit this code ({type(err).__name__}); "
                        f"retrain it with this version") from None
    return net


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_copy(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def check_resume_args(ckpt: dict, args, keys) -> None:
    """A resumed run must be configured as the run it continues."""
    record = args_record(args)
    for key in keys:
        then, now = ckpt["args"].get(key), record[key]
        if then != now:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {now} differs from the run being resumed ({then}); "
                            f"use the same value or drop --resume")
