"""Stage 3: train the student on labelled data plus an unlabelled objective (SPEC section 6).

    L = L_sup(labelled: cross-entropy + soft Dice) + lambda(s) * L_unsup(unlabelled)

--method picks L_unsup: supervised (none), pseudo_label, mean_teacher, kd, wkd, or wkd_refine (the
paper's method: the weighted KD loss against teacher logits refined by SinusCycle-GAN). For the
KD methods, --weight overrides the method's weight and --refiner switches refinement on, so every
cell of the ablation grid is one command. Teacher and refiner are frozen; the split and input size
come from the teacher checkpoint.
"""
import copy
import math

import torch
import torch.nn.functional as F

from data import augment_geometry, augment_photometric, batch_indices, load_tensors, prepare_dataset, step_generator
from engine.checkpoint import check_resume_args, load_checkpoint
from engine.errors import UserError, exit_on_user_error
from engine.frozen import load_teacher
from engine.loop import check_finite, poly_lr, run_steps
from engine.losses import supervised_loss
from engine.refine import load_refiner, refined_logits
from engine.run import autocast, base_parser, memory_format, open_run_logs, positive_int, resolved_path, \
    seed_everything, select_device, writable_file
from engine.split import inherited_split
from engine.stage import StageState, labeled_batch, validation_dice
from kernels import weighted_kd_loss
from nets.unet import UNet

METHODS = ("supervised", "pseudo_label", "mean_teacher", "kd", "wkd", "wkd_refine")
KD_WEIGHT = dict(kd="none", wkd="ssim", wkd_refine="ssim")
RESUME_KEYS = ("data", "seed", "steps", "batch_size", "unlabeled_batch_size", "lr", "val_every", "method",
               "weight", "temperature", "lambda_max", "ramp_steps", "width", "init", "teacher", "refiner",
               "precision", "channels_last", "ema_decay", "confidence", "deterministic")


def parse_args(argv=None):
    p = base_parser(__doc__, out="student.pt")
    p.set_defaults(size=None)
    p.add_argument("--teacher", type=resolved_path, required=True,
                   help="teacher checkpoint (gives the split and the input size)")
    p.add_argument("--refiner", type=resolved_path, default=None,
                   help="SinusCycle-GAN checkpoint; refines the teacher logits")
    p.add_argument("--method", choices=METHODS, default="wkd_refine",
                   help="unlabelled objective (see the description above)")
    p.add_argument("--weight", choices=("none", "agree", "ssim"), default=None,
                   help="KD pixel weight; default: none for kd, ssim for wkd and wkd_refine")
    p.add_argument("--temperature", type=float, default=1.0, help="KD softmax temperature")
    p.add_argument("--lambda-max", type=float, default=1.0, help="weight of the unlabelled loss after ramp-up")
    p.add_argument("--ramp-steps", type=positive_int, default=200, help="sigmoid-shaped ramp-up length of lambda")
    p.add_argument("--unlabeled-batch-size", type=positive_int, default=4, help="unlabelled images per step")
    p.add_argument("--labeled-ratio", type=float, default=None,
                   help="only checked against the teacher's split (a different value is an error)")
    p.add_argument("--width", type=positive_int, default=16, help="student U-Net width")
    p.add_argument("--init", choices=("scratch", "teacher"), default="scratch",
                   help="start from random weights or from the teacher's (same width only)")
    p.add_argument("--ema-decay", type=float, default=0.99, help="mean_teacher: EMA decay of the teacher copy")
    p.add_argument("--confidence", type=float, default=0.9, help="pseudo_label: minimum teacher probability")
    return p.parse_args(argv)


def check_method_flags(args) -> None:
    if args.method == "wkd_refine" and args.refiner is None:
        raise UserError("--method wkd_refine needs --refiner cyclegan.pt (or use --method wkd)")
    if args.method not in KD_WEIGHT and (args.refiner or args.weight):
        raise UserError(f"--refiner and --weight apply to the KD methods only, not --method {args.method}")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: must be positive")


def ramp(step: int, lambda_max: float, ramp_steps: int) -> float:
    """lambda(s) = lambda_max * exp(-5 (1 - s / s_ramp)^2) before s_ramp, lambda_max after."""
    if step >= ramp_steps:
        return lambda_max
    return lambda_max * math.exp(-5.0 * (1.0 - step / ramp_steps) ** 2)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """Mean-teacher update; the decay warms up as 1 - 1/(step + 1) so early weights are not frozen in."""
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(alpha).add_(p, alpha=1.0 - alpha)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def pseudo_label_loss(student_logits, teacher_logits, confidence: float):
    """Cross-entropy to the teacher's hard labels where its top probability reaches `confidence`."""
    prob, label = teacher_logits.float().softmax(1).max(1)
    keep = (prob >= confidence).float()
    ce = F.cross_entropy(student_logits.float(), label, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp(min=1.0)


def consistency_loss(student_logits, ema_logits):
    return F.mse_loss(student_logits.float().softmax(1), ema_logits.float().softmax(1))


def noisy(x: torch.Tensor, g: torch.Generator, sigma: float = 0.05) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=g).to(x.device) * sigma
    return (x + noise).clamp(0, 1)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    check_method_flags(args)
    weight = args.weight or KD_WEIGHT.get(args.method)
    device = select_device(args.device)
    out = writable_file(args.out)
    root = prepare_dataset(args.data)
    teacher, tckpt = load_teacher(args.teacher, device)
    split = inherited_split(tckpt, "--teacher", args.teacher, args.labeled_ratio, root)
    size = tuple(tckpt["size"])
    if args.size is not None and tuple(args.size) != size:
        raise UserError(f"--size {args.size[0]} {args.size[1]} differs from --teacher {args.teacher}, trained at "
                        f"{size[0]} {size[1]}; drop --size")
    refiner = None
    if args.refiner:
        refiner, _ = load_refiner(args.refiner, device, tckpt)
    resume = load_checkpoint(out, ("student",), "--out") if args.resume and out.exists() else None
    if resume:
        check_resume_args(resume, args, RESUME_KEYS)
    seed_everything(args.seed, args.deterministic)

    images, masks = load_tensors(root, split["labeled"], size)
    unlabeled = load_tensors(root, split["unlabeled"], size, with_masks=False)[0] if args.method != "supervised" \
        else None
    val_images, val_masks = load_tensors(root, split["val"], size)
    if unlabeled is not None and len(unlabeled) == 0:
        raise UserError(f"--method {args.method} needs unlabelled images, but the split of --teacher has none")
    model = UNet(width=args.width).to(device, memory_format=memory_format(args))
    if args.init == "teacher":
        if model.config != teacher.config:
            raise UserError(f"--init teacher needs --width {teacher.config['width']} (the teacher's)")
        model.load_state_dict(teacher.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lr(args.steps))
    modules = dict(model=model, optimizer=opt, scheduler=sched)
    ema = None
    if args.method == "mean_teacher":
        ema = copy.deepcopy(model)
        for p in ema.parameters():
            p.requires_grad_(False)
        modules["ema"] = ema
    state = StageState("student", out, model, modules, args, split, size,
                       extra=dict(method=args.method, weight=weight, refined=refiner is not None))
    start = state.restore(resume) if resume else 0

    logs, logger = open_run_logs(out, args, split, dict(kind="student", network=model.config, weight=weight))
    logger.info("student %s (weight %s, refined %s): %d labelled, %d unlabelled, %d val at %s on %s", args.method,
                weight, refiner is not None, len(images), 0 if unlabeled is None else len(unlabeled),
                len(val_images), size, device)

    def unlabeled_loss(step, n_l, xu, logits):
        """L_unsup for the unlabelled part of the joint student forward pass."""
        zu = logits[n_l:]
        if args.method == "mean_teacher":
            with torch.no_grad(), autocast(args, device):
                target = ema(noisy(xu, step_generator(args.seed, step, "ema-noise")))
            return consistency_loss(zu, target)
        with torch.no_grad(), autocast(args, device):
            zt = teacher(xu)
            if refiner is not None:
                zt = refined_logits(refiner, xu, zt)
        if args.method == "pseudo_label":
            return pseudo_label_loss(zu, zt, args.confidence)
        return weighted_kd_loss(zu, zt, weight=weight, temperature=args.temperature)

    def train_step(step):
        xl, yl = labeled_batch(images, masks, args.batch_size, args.seed, step, device)
        parts = [xl]
        if unlabeled is not None:
            iu = batch_indices(len(unlabeled), args.unlabeled_batch_size, args.seed + 1, step)
            gu = step_generator(args.seed, step, "unlabeled")
            xu, _ = augment_geometry(unlabeled[iu].to(device), None, gu)
            # Photometric changes for the student only: teacher and student see the same geometry.
            xs = augment_photometric(xu, gu)
            if args.method == "mean_teacher":
                xs = noisy(xs, step_generator(args.seed, step, "student-noise"))
            parts.append(xs)
        with autocast(args, device):
            logits = model(torch.cat(parts).contiguous(memory_format=memory_format(args)))
        sup = supervised_loss(logits[:len(xl)], yl)
        losses = {"sup": check_finite(sup, "supervised loss")}
        loss = sup
        if unlabeled is not None:
            unsup = unlabeled_loss(step, len(xl), xu, logits)
            losses["unsup"] = check_finite(unsup, "unlabelled loss")
            loss = sup + ramp(step, args.lambda_max, args.ramp_steps) * unsup
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema_update(ema, model, step, args.ema_decay)
        return losses

    run_steps(desc=f"student {args.method}", steps=args.steps, start_step=start, val_every=args.val_every,
              train_step=train_step, validate=lambda: validation_dice(model, val_images, val_masks, device),
              save=state.save, checkpoint_path=out, logger=logger)
    print(f"{out}: best validation Dice {state.best['score']:.4f} at step {state.best['step']}; logs in {logs}/")


if __name__ == "__main__":
    main()
