"""Run state: checkpoints, random streams, resume, and the records written beside every run.

A checkpoint is one file holding what later stages need (`kind`, `config`, the best weights
`model`, the resolved `split`, `size`, `metrics`, the settings `args`, `code_version`, whether its
training `finished`, and for a refiner or student `teacher_sha256`, the identity of the teacher it
learnt from) and what `--resume` needs (`train_state`: current weights, optimizer, scheduler,
step, RNG states, best-so-far). It holds tensors and plain Python values only, so it loads with
`torch.load(weights_only=True)`: a checkpoint from a stranger cannot run code when opened.
"""
import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from data import SPLIT_KEYS, derive_seed
from errors import UserError

from .cli import settings_json
from .records import git_hash, lock_output, write_atomic

# Flags a resumed run may change: where it writes, whether it resumes or overwrites, and on which device.
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "device")


# ---------------------------------------------------------------------------------------------
# checkpoint files

def save_checkpoint(path, state: dict) -> None:
    """Atomically: a crash never leaves half a checkpoint."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path, flag: str) -> dict:
    """The raw contents of a checkpoint file, opened without running any code it may carry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # torch raises several types for foreign or corrupt files
        unsafe = "unsupported global" in str(err).lower()
        reason = "it holds Python objects other than tensors and plain values, refused unopened" if unsafe \
            else f"not a readable checkpoint ({type(err).__name__})"
        raise UserError(f"{flag} {path}: {reason}") from None
    if not isinstance(state, dict):
        raise UserError(f"{flag} {path}: not a sinus-wkd checkpoint")
    return state


def _of(kind):
    return lambda value: isinstance(value, kind)


def _size(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)


def _split(value) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), list) for k in SPLIT_KEYS)


# what every stage writes, with the form later code relies on; and what a stage that learns from a
# teacher adds
CHECKPOINT_FIELDS = dict(config=_of(dict), model=_of(dict), split=_split, size=_size, train_state=_of(dict),
                         args=_of(dict), metrics=_of(dict), step=_of(int), classes=_of(object),
                         data_fingerprint=_of(object), finished=_of(bool))
TAUGHT_FIELDS = dict(teacher_sha256=_of(str))
TAUGHT_KINDS = ("cyclegan", "student")


def load_checkpoint(path, kinds, flag: str, finished: bool = True) -> dict:
    """A checkpoint given on the command line as `flag`; it must be of one of `kinds` and, with
    `finished`, hold a training run that ran to its end (not one stopped part-way)."""
    state = read_checkpoint(path, flag)
    kind = state.get("kind")
    if kind not in kinds:
        want = " or ".join(kinds)
        raise UserError(f"{flag} {path}: is a {kind or 'foreign'} checkpoint, expected a {want} checkpoint")
    fields = dict(CHECKPOINT_FIELDS, **(TAUGHT_FIELDS if kind in TAUGHT_KINDS else {}))
    missing = [k for k in fields if k not in state]
    if missing:
        raise UserError(f"{flag} {path}: incomplete {kind} checkpoint (no {', '.join(missing)}); retrain it")
    malformed = [k for k, form in fields.items() if not form(state[k])]
    if malformed:
        raise UserError(f"{flag} {path}: malformed {kind} checkpoint ({', '.join(malformed)}); retrain it")
    if finished and not state["finished"]:
        raise UserError(f"{flag} {path}: its training did not finish ({progress(state)}); continue it with "
                        f"--resume and the same flags, or train it again")
    return state


def progress(ckpt: dict) -> str:
    """How far a checkpoint's run got, e.g. "stopped at step 220 of 400"."""
    return f"stopped at step {ckpt.get('step', '?')} of {ckpt.get('args', {}).get('steps', '?')}"


def weights_sha256(weights: dict) -> str:
    """A content hash of a network's weights (names, dtypes, shapes and bytes): its identity, so that a
    teacher retrained in place, even with the same seed and split, is told from the one a refiner or
    student learnt from."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}\t{tensor.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_same_experiment(ckpt: dict, flag: str, path, teacher_ckpt: dict) -> None:
    """A refiner must come from this very teacher: the same split and input size, and the teacher's
    weights it recorded."""
    if ckpt["split"] != teacher_ckpt["split"] or list(ckpt["size"]) != list(teacher_ckpt["size"]):
        raise UserError(f"{flag} {path} was trained from another teacher (its split or size differ); "
                        f"train it from this teacher")
    now = weights_sha256(teacher_ckpt["model"])
    if ckpt["teacher_sha256"] != now:
        raise UserError(f"{flag} {path} was trained from another teacher (weights {ckpt['teacher_sha256'][:12]}, "
                        f"this teacher's {now[:12]}; retrained in place?); train it from this teacher")


def weights_copy(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# random state: stored as tensors, so that checkpoints stay weights-only

def rng_state(device: torch.device) -> dict:
    """Every random stream a run draws from; of the GPUs, only `device`'s, the one the run uses, so
    that the run can resume on another GPU or where fewer are visible."""
    version, python, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=torch.tensor(python, dtype=torch.int64), python_version=version, python_gauss=gauss,
                 numpy=torch.from_numpy(keys.astype(np.int64)), numpy_pos=int(pos), numpy_has_gauss=int(has_gauss),
                 numpy_cached=float(cached), torch=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore `rng_state`'s streams; its GPU stream becomes `device`'s."""
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_stage(seed: int, stage: str, deterministic: bool) -> int:
    """Seed every generator for `stage` of the experiment `seed`; return the stage's own seed, from
    which its batches and augmentations derive. The stages of one experiment therefore draw
    independent streams: a student does not replay its teacher's initialisation or batches,
    while all students of one seed share theirs, so that they differ only in their objective."""
    stage_seed = derive_seed(seed, stage)
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2 ** 32)
    torch.manual_seed(stage_seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Switched off too, since a process may run several stages; only when needed, because the call
    # imports torch's compiler (seconds per run). The ops without a deterministic CUDA kernel
    # (settings.py's --deterministic names them) warn and run rather than stop the run.
    if deterministic or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return stage_seed


# ---------------------------------------------------------------------------------------------
# resume

def resume_from(out: Path, kind: str, settings) -> dict | None:
    """Make `out` this run's alone (engine.records.lock_output) and return the checkpoint a `--resume`
    run continues, checked to be configured as this run; None for a run that starts afresh. A
    checkpoint already at `out` is never replaced unasked: a finished one only with --overwrite, an
    unfinished one with --resume (which continues it) or --overwrite."""
    if settings.resume and settings.overwrite:
        raise UserError("--resume and --overwrite: choose one (continue the run at --out, or replace it)")
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:    # rank 0 writes
        lock_output(out)
    if settings.overwrite or not out.exists():
        return None             # what is there goes when the run starts writing (records.open_run_logs)
    if not settings.resume:
        refuse_replacing(out, kind)
    ckpt = load_checkpoint(out, (kind,), "--out", finished=False)
    now = settings_json(settings)
    for key, value in now.items():
        then = ckpt["args"].get(key)
        if key not in RESUME_MAY_CHANGE and then != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {value} differs from the run being resumed ({then}); "
                            f"use the same value, or start the run again with --overwrite")
    return ckpt


def refuse_replacing(out: Path, kind: str) -> None:
    """The one-line refusal of a run without --resume or --overwrite whose --out holds a file."""
    try:
        ckpt = read_checkpoint(out, "--out")
    except UserError:
        ckpt = {}
    if ckpt.get("kind") != kind:
        what = f"a {ckpt['kind']} checkpoint" if isinstance(ckpt.get("kind"), str) else "a file that is no checkpoint"
        raise UserError(f"--out {out}: holds {what}, not a {kind}; choose another --out, or replace it with "
                        f"--overwrite")
    if ckpt.get("finished"):
        raise UserError(f"--out {out}: holds a finished {kind} (step {ckpt.get('step', '?')}); replace it with "
                        f"--overwrite, or choose another --out")
    raise UserError(f"--out {out}: holds an unfinished {kind} run ({progress(ckpt)}); continue it with --resume, "
                    f"or replace it with --overwrite")


class StageState:
    """Training modules, the best weights so far, and the one checkpoint file that holds both."""

    def __init__(self, kind: str, path, model, modules: dict, settings, split: dict, size,
                 extra: dict | None = None, config: dict | None = None, score: str = "dice"):
        """`model` is the network later stages use, `modules` everything with a state_dict that
        --resume needs, `score` the validation metric that picks the best when `settings.keep` is
        "best"; with "final" the weights of the latest check are kept."""
        self.kind, self.path, self.model, self.modules = kind, path, model, modules
        self.settings, self.split, self.size, self.extra = settings, split, list(size), extra or {}
        self.config, self.score = config or model.config, score
        self.best = dict(score=-float("inf"), step=0, metrics={}, weights=None)
        self.version, self.finished = git_hash(), False

    @property
    def device(self) -> torch.device:
        """The run's device: its network's."""
        return next(self.model.parameters()).device

    def restore(self, ckpt: dict) -> int:
        """Load the training state of `ckpt`; return the step to continue from. A run that learns from a
        teacher continues only with the teacher it started with."""
        if "teacher_sha256" in self.extra and ckpt["teacher_sha256"] != self.extra["teacher_sha256"]:
            raise UserError(f"--teacher {self.settings.teacher}: not the teacher the run at --out {self.path} "
                            f"started with (retrained in place?); resume with that teacher, or start again with "
                            f"--overwrite")
        state = ckpt["train_state"]
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        set_rng_state(state["rng"], self.device)
        self.best = dict(score=state["best_score"], step=state["best_step"], metrics=ckpt["metrics"],
                         weights=ckpt["model"])
        return state["step"]

    def save(self, step: int, metrics: dict) -> None:
        """Keep the model if it is the latest (--keep final) or its score the best yet, then write the
        checkpoint."""
        score = metrics[self.score]
        if score > self.best["score"] or self.settings.keep == "final":
            self.keep(weights_copy(self.model), step, metrics, score)
        self.write(step)

    def keep(self, weights: dict, step: int, metrics: dict, score: float) -> None:
        """Make `weights` the network later stages get, with the validation `metrics` of step `step`."""
        self.best.update(score=score, step=step, metrics=dict(metrics, step=step), weights=weights)

    def finish(self, step: int) -> None:
        """Write the checkpoint of the run's end: the one later stages accept."""
        self.finished = True
        self.write(step)

    def write(self, step: int) -> None:
        """The checkpoint of the kept network and of the training state at `step`, atomically."""
        train_state = {name: weights_copy(module) if isinstance(module, torch.nn.Module) else module.state_dict()
                       for name, module in self.modules.items()}
        train_state.update(step=step, rng=rng_state(self.device), best_score=self.best["score"],
                           best_step=self.best["step"])
        save_checkpoint(self.path, dict(
            kind=self.kind, config=self.config, model=self.best["weights"], split=self.split, size=self.size,
            metrics=self.best["metrics"], args=settings_json(self.settings), code_version=self.version, step=step,
            finished=self.finished, train_state=train_state, **self.extra))
