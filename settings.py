"""The settings the training stages share: one block, so that each default has one home.

Each stage script's own settings block adds its stage's settings to these (train_teacher.py,
train_cyclegan.py and train_student.py build theirs on `Training`; evaluate.py on `Common`), and
`python SCRIPT --help` lists them all with their defaults.
"""
import dataclasses
from pathlib import Path

from engine.cli import REPO, setting

DEFAULT_DATA = REPO / "data"


@dataclasses.dataclass
class Common:
    data: Path = setting(DEFAULT_DATA, "dataset root with images/, masks/ and an optional splits.json; the "
                                       "repository's data/ gets the phantom dataset generated on first use")
    out: Path | None = setting(None, "where the result goes")
    device: str = setting("auto", "where to run: auto (CUDA when available), cpu, cuda or cuda:N")


@dataclasses.dataclass
class Training(Common):
    seed: int = setting(0, "seed of the split (teacher), initialisation, batches and augmentation")
    steps: int = setting(1000, "training iterations", within="[1, inf)")
    batch_size: int = setting(4, "labelled images per step", within="[1, inf)")
    lr: float = setting(1e-3, "peak learning rate of Adam",
                        within="(0, inf)")
    val_every: int = setting(100, "validate and checkpoint every this many steps (and at the end)",
                             within="[1, inf)")
    keep: str = setting("final", "weights the checkpoint keeps for later stages: final (those of the last step) "
                                 "or best (those of the best validation check, which adds that check's noise)",
                        choices=("final", "best"))
    precision: str = setting("auto", "bf16 runs the networks under autocast; auto takes bf16 where the device "
                                     "computes it natively (CUDA, or CPUs with AVX512-BF16/AMX), fp32 elsewhere",
                             choices=("auto", "fp32", "bf16"))
    channels_last: bool = setting(True, "keep activations in the channels-last memory format")
    deterministic: bool = setting(False, "deterministic algorithms where torch has them, and no cuDNN autotune "
                                         "(slower); on CUDA, cross-entropy and the backward passes of bilinear "
                                         "upsampling and reflection padding have none and stay nondeterministic "
                                         "(torch warns)")
    resume: bool = setting(False, "continue the run stored at --out from its last checkpoint; the result equals "
                                  "an uninterrupted run")
    overwrite: bool = setting(False, "replace the checkpoint at --out and its logs (a run there is otherwise "
                                     "refused: a finished one, and an unfinished one without --resume)")
    aug_rotate: float = setting(5.0, "geometric augmentation: maximum rotation in degrees", within="[0, 180]")
    aug_scale: tuple[float, float] = setting((0.9, 1.1), "geometric augmentation: zoom range", within="(0, 10]",
                                             metavar=("LOW", "HIGH"))
    aug_shift: float = setting(0.05, "geometric augmentation: maximum shift, fraction of the image", within="[0, 1]")
    aug_flip: float = setting(0.5, "geometric augmentation: probability of a left-right flip", within="[0, 1]")


@dataclasses.dataclass
class LabelledPhotometric:
    aug_gamma: float = setting(0.3, "photometric augmentation of labelled images: log-gamma range +-",
                               within="[0, 3]")
    aug_contrast: tuple[float, float] = setting((0.8, 1.2), "photometric augmentation: contrast factor range",
                                                within="(0, 10]", metavar=("LOW", "HIGH"))
    aug_brightness: float = setting(0.1, "photometric augmentation: brightness offset range +-", within="[0, 1]")
    aug_noise: float = setting(0.03, "photometric augmentation: maximum Gaussian noise sigma", within="[0, 1]")
