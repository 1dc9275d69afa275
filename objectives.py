"""The student's objective (SPEC section 6), all of it in one file.

    L = L_sup(labelled: cross-entropy + soft Dice) + lambda(s) * L_unsup(unlabelled)
    lambda(s) = lambda_max * exp(-5 (1 - s / s_ramp)^2) for s < s_ramp, then lambda_max

Each unlabelled objective is one function registered with `@objective`; the registry is what
`--method` offers, what Table 1 lists and what the reproduction plan trains. An objective gets
the student's logits on its view of the unlabelled batch and the target logits of a frozen
network on the clean view (the teacher's, refined by SinusCycle-GAN if the objective says so,
or the student's own EMA copy for mean_teacher), plus the run's settings, and returns L_unsup,
or (L_unsup, {name: float}) with numbers worth logging. An objective that needs more than one
loss of one student pass (input mixing, several passes, perturbed features) registers a `step`
instead: a function of the step's `StepInputs` returning the same; a plain loss is the step
`loss(student(noised), targets(clean), settings)`.
The KD pixel weights (`--weight`) are registered in `kernels.kd_loss`; the KD objectives share
one step, `kd_step`, and differ in their default weight and whether the targets are refined.
"""
import dataclasses
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from errors import UserError
from kernels import weighted_kd_loss
from nets.postprocess import largest_per_side


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What an objective's step sees of one training step."""
    labelled: torch.Tensor      # (N, 1, H, W) the labelled batch as the supervised term saw it
    masks: torch.Tensor         # (N, H, W) its expert masks
    clean: torch.Tensor         # (M, 1, H, W) the clean view of the unlabelled batch
    noised: torch.Tensor        # the student's strongly perturbed view of it
    student: Callable           # (x, features=None) -> logits: a student pass that leaves the BatchNorm
    #                             running statistics alone and draws dropout from a stream of its own
    targets: Callable           # x -> logits of the objective's target network, no gradient
    perturb: Callable           # (x, generator) -> another strongly perturbed view of x
    generator: torch.Generator  # for the objective's own draws (boxes), a stream of its own
    settings: object
    truth: torch.Tensor | None = None   # (M, H, W) the clean view's true masks: oracle upper bounds only


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable | None     # (student_logits, target_logits, settings) -> scalar tensor
    target: str | None        # network giving the targets: "teacher", "ema", "student" (the objective
    #                           makes its own from the student's pass), or None (no unlabelled term)
    weight: str | None        # default KD pixel weight; None for objectives that are not KD
    refine: bool              # the teacher's logits are refined by SinusCycle-GAN (needs --refiner)
    summary: str
    step: Callable | None = None    # (StepInputs) -> L_unsup or (L_unsup, logs); None: the plain loss's

    def unlabelled_term(self, b: StepInputs):
        if self.step is not None:
            return self.step(b)
        return self.loss(b.student(b.noised), b.targets(b.clean), b.settings)


OBJECTIVES: dict[str, Objective] = {}


def objective(name: str, *, target: str | None = "teacher", weight: str | None = None, refine: bool = False,
              summary: str | None = None, step: bool = False):
    """Register an unlabelled objective under `name`; by default its docstring's first line describes it.
    With `step`, the function registered is a step (of `StepInputs`), not a loss."""
    def register(fn):
        OBJECTIVES[name] = Objective(name, None if step else fn, target, weight, refine,
                                     summary or fn.__doc__.strip().splitlines()[0], fn if step else None)
        return fn
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


ORACLE_MARGIN = 10.0    # logit of the true class in oracle targets: softmax 0.99995, KD ~ cross-entropy


def oracle_logits(truth: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, C, H, W) logits whose softmax is the true masks' one-hot up to ORACLE_MARGIN."""
    return ORACLE_MARGIN * F.one_hot(truth, classes).permute(0, 3, 1, 2).float()


def kd_weight(method: str, s) -> str:
    """The KD pixel weight a run uses: --weight, else its method's."""
    return s.weight or OBJECTIVES[method].weight


def kd_step(b: StepInputs):
    """The weighted KD loss of SPEC section 4 on the clean view's targets. The oracle upper bounds,
    which read the unlabelled batch's true masks (`b.truth`), replace the weight by 1 where the
    teacher's argmax is right and 0 elsewhere (--oracle weight), or the targets by the true masks
    (--oracle targets)."""
    s = b.settings
    student, targets, weight = b.student(b.noised), b.targets(b.clean), kd_weight(s.method, s)
    if s.oracle == "weight":
        weight = (targets.argmax(1) == b.truth).float()
    elif s.oracle == "targets":
        targets = oracle_logits(b.truth, targets.shape[1])
    return weighted_kd_loss(student, targets, weight=weight, temperature=s.temperature, window=s.weight_window,
                            gamma=s.weight_gamma, map_temperature=s.weight_map_temperature)


objective("kd", weight="none", step=True, summary="KD to the teacher, every pixel weighted 1")(kd_step)
objective("wkd", weight="ssim", step=True, summary="KD weighted by the structural agreement of teacher and "
                                                    "student")(kd_step)
objective("kd_refine", weight="none", refine=True, step=True,
          summary="kd against teacher logits refined by SinusCycle-GAN")(kd_step)
objective("wkd_refine", weight="ssim", refine=True, step=True,
          summary="wkd against teacher logits refined by SinusCycle-GAN (the paper's method)")(kd_step)


# ---------------------------------------------------------------------------------------------
# the modern baselines: BCP and UniMatch, each a step

def masked_dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5):
    """The Dice loss of BCP's and UniMatch's code (SSL4MIS's): per class, the background included,
    over the masked pixels of the batch, squared probabilities in the denominator, averaged."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    m = mask[:, None].to(probs.dtype)
    inter = (probs * onehot * m).sum(dim=(0, 2, 3))
    denom = ((probs * probs + onehot) * m).sum(dim=(0, 2, 3))
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def region_loss(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the pixels of `region` plus the masked Dice there: one term of
    BCP's mix_loss."""
    region = region.to(torch.float32)
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * region).sum() / region.sum().clamp(min=1e-16) + masked_dice_loss(logits, target, region)


def copy_paste_box(shape, g: torch.Generator, fraction: float = 2 / 3) -> torch.Tensor:
    """BCP's box: a (H, W) bool mask, True on one rectangle of `fraction` of each side at a uniform
    integer position, the same for the whole batch."""
    h, w = shape
    bh, bw = int(h * fraction), int(w * fraction)
    top = int(torch.randint(max(1, h - bh), (1,), generator=g))
    left = int(torch.randint(max(1, w - bw), (1,), generator=g))
    box = torch.zeros(h, w, dtype=torch.bool)
    box[top:top + bh, left:left + bw] = True
    return box


def largest_component_per_side(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """BCP keeps each class's largest connected component of a pseudo label; a radiograph holds one
    sinus per side, so here it is each side's (the image cut at its middle column)."""
    arrays = labels.cpu().numpy()
    out = np.zeros_like(arrays)
    for image, kept in zip(arrays, out):
        for c in range(1, classes):
            kept[largest_per_side(image == c)] = c
    return torch.from_numpy(out).to(labels.device)


BCP_UNLABELLED_WEIGHT = 0.5    # BCP's u_weight: the pixels of a mixed image that come from the unlabelled one


@objective("bcp", target="ema", step=True)
def bcp_step(b: StepInputs):
    """BCP: labelled and unlabelled images copy-pasted both ways by one box, EMA pseudo labels"""
    half = min(len(b.labelled), len(b.clean)) // 2
    if half < 1:
        raise UserError("--method bcp pairs two labelled with two unlabelled images: --batch-size and "
                        "--unlabeled-batch-size must be at least 2")
    xl, yl, xu = b.labelled[:2 * half], b.masks[:2 * half], b.clean[:2 * half]
    target = b.targets(xu)
    pseudo = largest_component_per_side(target.argmax(1), target.shape[1])
    box = copy_paste_box(xu.shape[-2:], b.generator).to(xu.device)
    inward, outward = slice(0, half), slice(half, 2 * half)
    # inward: the unlabelled image with a labelled box pasted in; outward: the other way round
    x_in = torch.where(box, xl[inward], xu[inward])
    x_out = torch.where(box, xu[outward], xl[outward])
    y_in = torch.where(box, yl[inward], pseudo[inward])
    y_out = torch.where(box, pseudo[outward], yl[outward])
    z_in, z_out = b.student(x_in), b.student(x_out)
    inside = box.expand(half, *box.shape)
    u = BCP_UNLABELLED_WEIGHT
    loss = (region_loss(z_in, y_in, inside) + u * region_loss(z_in, y_in, ~inside)
            + region_loss(z_out, y_out, ~inside) + u * region_loss(z_out, y_out, inside))
    return loss, {"box": box.float().mean().item()}


def cutmix_boxes(n: int, shape, g: torch.Generator, p: float = 0.5, area=(0.02, 0.4),
                 ratio=(0.3, 1 / 0.3)) -> torch.Tensor:
    """UniMatch's CutMix boxes, one per image with probability `p`: (n, H, W) bool, a rectangle of
    `area` of the image and aspect ratio `ratio`, placed uniformly, redrawn until it fits."""
    h, w = shape
    boxes = torch.zeros(n, h, w, dtype=torch.bool)
    for box in boxes:
        if float(torch.rand((), generator=g)) >= p:
            continue
        size = (area[0] + float(torch.rand((), generator=g)) * (area[1] - area[0])) * h * w
        while True:
            r = ratio[0] + float(torch.rand((), generator=g)) * (ratio[1] - ratio[0])
            bw, bh = int(math.sqrt(size / r)), int(math.sqrt(size * r))
            left, top = int(torch.randint(w, (), generator=g)), int(torch.randint(h, (), generator=g))
            if left + bw <= w and top + bh <= h:
                break
        box[top:top + bh, left:left + bw] = True
    return boxes


def perturb_features(features: list) -> list:
    """UniMatch's feature perturbation: each encoder feature followed by its copy under channel
    dropout 0.5, so that one decoder pass gives the clean and the perturbed prediction."""
    return [torch.cat((f, F.dropout2d(f, 0.5, training=True))) for f in features]


@objective("unimatch", target="student", step=True)
def unimatch_step(b: StepInputs):
    """UniMatch: weak-to-strong consistency, two CutMix strong views and a feature-perturbed branch"""
    s = b.settings
    weak, fp = b.student(b.clean, features=perturb_features).chunk(2)
    conf, label = weak.detach().float().softmax(1).max(1)
    # CutMix partner: the previous image of the batch (a roll by one), whose weak prediction gives the box's labels
    terms = []
    for view in (b.noised, b.perturb(b.clean, b.generator)):
        box = cutmix_boxes(len(view), view.shape[-2:], b.generator).to(view.device)
        terms.append((torch.where(box[:, None], view.roll(1, 0), view), torch.where(box, label.roll(1, 0), label),
                      torch.where(box, conf.roll(1, 0), conf)))
    strong = b.student(torch.cat([x for x, _, _ in terms])).chunk(2)
    loss_s = [masked_dice_loss(z, y, c >= s.confidence) for z, (_, y, c) in zip(strong, terms)]
    loss_fp = masked_dice_loss(fp, label, conf >= s.confidence)
    # UniMatch: (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 with L_x = (CE + Dice) / 2; this repo's
    # L_sup is CE + Dice, so the same proportions are L_sup + 0.5 L_s1 + 0.5 L_s2 + L_fp
    return 0.5 * (loss_s[0] + loss_s[1]) + loss_fp, {"kept": (conf >= s.confidence).float().mean().item()}


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
