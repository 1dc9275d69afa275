"""The student's objective (SPEC section 6), all of it in one file.

    L = L_sup(labelled: cross-entropy + soft Dice) + lambda(s) * L_unsup(unlabelled)
    lambda(s) = lambda_max * exp(-5 (1 - s / s_ramp)^2) for s < s_ramp, then lambda_max

Each unlabelled objective is one function registered with `@objective`; the registry is what
`--method` offers, what Table 1 lists and what the reproduction plan trains. An objective gets
the student's logits on its view of the unlabelled batch and the target logits of a frozen
network on the clean view (the teacher's, refined by SinusCycle-GAN if the objective says so,
or the student's own EMA copy for mean_teacher), plus the run's settings, and returns L_unsup,
or (L_unsup, {name: float}) with numbers worth logging.
The KD pixel weights (`--weight`) are registered in `kernels.kd_reference`.
"""
import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from kernels import weighted_kd_loss


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable | None     # (student_logits, target_logits, settings) -> scalar tensor
    target: str | None        # network giving the targets: "teacher", "ema", or None (no unlabelled term)
    weight: str | None        # default KD pixel weight; None for objectives that are not KD
    refine: bool              # the teacher's logits are refined by SinusCycle-GAN (needs --refiner)
    summary: str


OBJECTIVES: dict[str, Objective] = {}


def objective(name: str, *, target: str | None = "teacher", weight: str | None = None, refine: bool = False,
              summary: str | None = None):
    """Register an unlabelled objective under `name`; by default its docstring's first line describes it."""
    def register(loss):
        OBJECTIVES[name] = Objective(name, loss, target, weight, refine,
                                     summary or loss.__doc__.strip().splitlines()[0])
        return loss
    return register


# ---------------------------------------------------------------------------------------------
# the labelled term and the ramp

def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5, total=None) -> torch.Tensor:
    """1 - Dice of the softmax probabilities, pooled over the batch, averaged over foreground classes.
    `total` sums the pooled counts over the processes of a data-parallel run (a global batch)."""
    probs = logits.float().softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    counts = torch.stack([(probs * onehot).sum(dim=(0, 2, 3)), probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))])
    inter, denom = total(counts) if total else counts
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, total=None) -> torch.Tensor:
    """L_sup: cross-entropy plus soft Dice (what the teacher is trained with, too)."""
    return F.cross_entropy(logits.float(), target) + soft_dice_loss(logits, target, total=total)


def ramp(step: int, lambda_max: float, ramp_steps: int) -> float:
    """lambda(s) = lambda_max * exp(-5 (1 - s / s_ramp)^2) before s_ramp, lambda_max after."""
    if step >= ramp_steps:
        return lambda_max
    return lambda_max * math.exp(-5.0 * (1.0 - step / ramp_steps) ** 2)


# ---------------------------------------------------------------------------------------------
# unlabelled objectives

OBJECTIVES["supervised"] = Objective("supervised", None, None, None, False,
                                     "labelled data only: the supervised control")


@objective("pseudo_label")
def pseudo_label_loss(student_logits, teacher_logits, s):
    """cross-entropy to the teacher's hard labels where its top probability reaches --confidence"""
    prob, label = teacher_logits.float().softmax(1).max(1)
    keep = (prob >= s.confidence).float()
    ce = F.cross_entropy(student_logits.float(), label, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp(min=1.0), {"kept": keep.mean().item()}


@objective("mean_teacher", target="ema")
def consistency_loss(student_logits, ema_logits, s):
    """MSE between the softmax of the student (noised view) and of its EMA copy (--ema-decay, clean view)"""
    return F.mse_loss(student_logits.float().softmax(1), ema_logits.float().softmax(1))


def kd_loss(weight: str):
    """The weighted KD loss of SPEC section 4 with `weight` as the default pixel weight (--weight overrides)."""
    def loss(student_logits, teacher_logits, s):
        return weighted_kd_loss(student_logits, teacher_logits, weight=weight if s.weight is None else s.weight,
                                temperature=s.temperature, window=s.weight_window, gamma=s.weight_gamma,
                                map_temperature=s.weight_map_temperature)
    return loss


objective("kd", weight="none", summary="KD to the teacher, every pixel weighted 1")(kd_loss("none"))
objective("wkd", weight="ssim", summary="KD weighted by the structural agreement of teacher and student")(
    kd_loss("ssim"))
objective("wkd_refine", weight="ssim", refine=True,
          summary="wkd against teacher logits refined by SinusCycle-GAN (the paper's method)")(kd_loss("ssim"))


# ---------------------------------------------------------------------------------------------
# what the objectives need besides a loss

def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """Mean-teacher update; the decay warms up as 1 - 1/(step + 1) so early weights are not frozen in."""
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(alpha).add_(p, alpha=1.0 - alpha)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)
