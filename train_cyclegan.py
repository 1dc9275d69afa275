"""Stage 2: train SinusCycle-GAN, the unpaired refiner of the teacher's pseudo labels (SPEC section 5).

Domain A: unlabelled images xu with the frozen teacher's foreground probability qT(xu); domain B:
labelled images xl with their expert masks yl. G_AB(x, q) returns a refined foreground logit r,
G_BA(x, y) a teacher-like soft mask; the discriminators D_A, D_B judge (image, mask) pairs.
The checkpoint keeps the G_AB whose refinement gains most validation Dice over the teacher.

Design: each generator is residual by default: it returns the logit of its input mask plus a
correction whose last layer starts at zero, so an untrained G_AB returns the teacher's own
prediction, and the checkpoint is validated at step 0 too. Refinement therefore starts from the
teacher and the kept G_AB is never worse on validation than no refinement at all. Without it
(--no-residual) the generator must first learn to copy its input mask; with small networks and
short schedules on the phantom it collapsed to an all-background mask (refined val Dice 0.06
against the teacher's 0.83 at 64x128, widths 8/16, 400 steps), while with longer schedules it
recovered and reached the same peak as the residual design.
"""
import argparse

import torch
import torch.nn.functional as F

from data import augment_geometry, batch_indices, load_tensors, prepare_dataset, step_generator
from data.augment import derive_seed
from engine.checkpoint import check_resume_args, load_checkpoint
from engine.errors import UserError, exit_on_user_error
from engine.frozen import load_teacher
from engine.loop import check_finite, run_steps
from engine.metrics import overlap_metrics, summarize
from engine.predict import predict_logits
from engine.refine import refine_all, teacher_foreground
from engine.run import autocast, base_parser, memory_format, open_run_logs, positive_int, resolved_path, \
    seed_everything, select_device, writable_file
from engine.split import inherited_split
from engine.stage import StageState
from kernels import boundary_metrics
from nets.cyclegan import PatchDiscriminator, ResnetGenerator

RESUME_KEYS = ("data", "teacher", "seed", "size", "steps", "batch_size", "lr", "val_every", "width", "blocks",
               "residual", "disc_width", "cycle_weight", "identity_weight", "pool_size", "decay_start", "precision",
               "channels_last", "deterministic")


def parse_args(argv=None):
    p = base_parser(__doc__, out="cyclegan.pt")
    p.set_defaults(lr=2e-4, size=None)
    p.add_argument("--teacher", type=resolved_path, required=True,
                   help="teacher checkpoint whose pseudo labels to refine")
    p.add_argument("--labeled-ratio", type=float, default=None,
                   help="only checked: the split is the teacher's, and a different ratio is an error")
    p.add_argument("--width", type=positive_int, default=16, help="generator channels at full resolution")
    p.add_argument("--blocks", type=positive_int, default=4, help="residual blocks in each generator")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                   help="generators add the logit of their input mask to their output, so they start as the "
                        "identity (see the description above)")
    p.add_argument("--disc-width", type=positive_int, default=16, help="discriminator channels in its first layer")
    p.add_argument("--cycle-weight", type=float, default=10.0, help="weight of the cycle-consistency L1 losses")
    p.add_argument("--identity-weight", type=float, default=5.0, help="weight of the identity L1 G_AB(xl, yl) ~ yl")
    p.add_argument("--pool-size", type=int, default=50, help="fakes kept in each discriminator's history pool")
    p.add_argument("--decay-start", type=float, default=0.5,
                   help="fraction of --steps after which the learning rate decays linearly to 0")
    return p.parse_args(argv)


class HistoryPool:
    """Fakes shown to a discriminator: each new fake is, with probability 1/2 once the pool is full,
    swapped for a stored older one, so the discriminator does not only chase the latest generator.
    The draws come from the caller's generator, and the contents are saved, so resuming is exact."""

    def __init__(self, size: int, device: torch.device):
        self.size, self.device, self.items = size, device, []

    def query(self, fakes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        out = []
        for fake in fakes.detach():
            if len(self.items) < self.size:
                self.items.append(fake.clone())
                out.append(fake)
            elif self.size and torch.rand((), generator=g) < 0.5:
                i = int(torch.randint(self.size, (), generator=g))
                out.append(self.items[i])
                self.items[i] = fake.clone()
            else:
                out.append(fake)
        return torch.stack(out)

    def state_dict(self) -> list:
        return [t.cpu() for t in self.items]

    def load_state_dict(self, items: list) -> None:
        self.items = [t.to(self.device) for t in items]


def constant_then_linear(steps: int, decay_start: float):
    """LambdaLR factor: 1 until `decay_start * steps`, then linear to 0 at `steps`."""
    start = int(decay_start * steps)
    return lambda step: 1.0 if step < start else max(0.0, (steps - step) / max(steps - start, 1))


def lsgan(scores: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(scores, torch.full_like(scores, float(real)))


def pair(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([image, mask], dim=1)


@torch.no_grad()
def teacher_pseudo_labels(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Domain A's mask channel qT(xu); the teacher is a fixed input, never trained here."""
    return teacher_foreground(teacher(images))


def generator_loss(nets, xa, qa, xb, yb, cycle_weight: float, identity_weight: float):
    """LSGAN + cycle L1 + identity L1 for both generators -> (loss, fake A pair, fake B pair, parts)."""
    fake_b = torch.sigmoid(nets["G_AB"](pair(xa, qa)))           # refined pseudo label of xu
    fake_a = torch.sigmoid(nets["G_BA"](pair(xb, yb)))           # teacher-like mask of xl
    cycle_a = torch.sigmoid(nets["G_BA"](pair(xa, fake_b)))
    cycle_b = torch.sigmoid(nets["G_AB"](pair(xb, fake_a)))
    same_b = torch.sigmoid(nets["G_AB"](pair(xb, yb)))
    adversarial = lsgan(nets["D_B"](pair(xa, fake_b)), True) + lsgan(nets["D_A"](pair(xb, fake_a)), True)
    cycle = F.l1_loss(cycle_a, qa) + F.l1_loss(cycle_b, yb)
    identity = F.l1_loss(same_b, yb)
    loss = adversarial + cycle_weight * cycle + identity_weight * identity
    parts = dict(adv=adversarial.detach(), cycle=cycle.detach(), idt=identity.detach())
    return loss, pair(xb, fake_a).detach(), pair(xa, fake_b).detach(), parts


def discriminator_loss(nets, real_a, real_b, fake_a, fake_b):
    return 0.5 * (lsgan(nets["D_A"](real_a), True) + lsgan(nets["D_A"](fake_a), False)
                  + lsgan(nets["D_B"](real_b), True) + lsgan(nets["D_B"](fake_b), False))


def mask_metrics(logits: torch.Tensor, masks: torch.Tensor) -> dict:
    """Mean Dice and HD95 (pixels at training size; over the cases where it is defined) of argmax."""
    pred, target = logits.argmax(1) == 1, masks == 1
    hd95 = boundary_metrics(pred, target)["hd95"]
    return dict(dice=overlap_metrics(pred, target)["dice"].mean().item(),
                hd95=summarize(hd95.tolist())["mean"], hd95_undefined=float(hd95.isnan().sum()))


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    device = select_device(args.device)
    if not 0 <= args.decay_start <= 1:
        raise UserError(f"--decay-start {args.decay_start}: must be a fraction of --steps in [0, 1]")
    if args.pool_size < 0:
        raise UserError(f"--pool-size {args.pool_size}: must be 0 (no pool) or more")
    out = writable_file(args.out)
    root = prepare_dataset(args.data)
    teacher, teacher_ckpt = load_teacher(args.teacher, device)
    size = tuple(teacher_ckpt["size"])
    if args.size is not None and tuple(args.size) != size:
        raise UserError(f"--size {args.size[0]} {args.size[1]} differs from --teacher {args.teacher}, trained at "
                        f"{size[0]} {size[1]}; drop --size (the refiner works at the teacher's size)")
    split = inherited_split(teacher_ckpt, "--teacher", args.teacher, args.labeled_ratio, root)
    if not split["unlabeled"]:
        raise UserError(f"--teacher {args.teacher}: its split has no unlabelled images to refine; retrain the "
                        f"teacher with --labeled-ratio below 1")
    resume = load_checkpoint(out, ("cyclegan",), "--out") if args.resume and out.exists() else None
    if resume:
        check_resume_args(resume, args, RESUME_KEYS)
    seed_everything(args.seed, args.deterministic)

    unlabeled, _ = load_tensors(root, split["unlabeled"], size, with_masks=False)
    labeled, labels = load_tensors(root, split["labeled"], size)
    val_images, val_masks = load_tensors(root, split["val"], size)
    val_teacher = predict_logits(teacher, val_images, device)
    teacher_metrics = mask_metrics(val_teacher, val_masks)

    nets = torch.nn.ModuleDict(dict(
        G_AB=ResnetGenerator(width=args.width, blocks=args.blocks, residual=args.residual),
        G_BA=ResnetGenerator(width=args.width, blocks=args.blocks, residual=args.residual),
        D_A=PatchDiscriminator(width=args.disc_width), D_B=PatchDiscriminator(width=args.disc_width)))
    nets.to(device, memory_format=memory_format(args))
    generators = [*nets["G_AB"].parameters(), *nets["G_BA"].parameters()]
    discriminators = [*nets["D_A"].parameters(), *nets["D_B"].parameters()]
    opt_g = torch.optim.Adam(generators, lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminators, lr=args.lr, betas=(0.5, 0.999))
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, constant_then_linear(args.steps, args.decay_start))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, constant_then_linear(args.steps, args.decay_start))
    pool_a, pool_b = HistoryPool(args.pool_size, device), HistoryPool(args.pool_size, device)
    config = dict(G_AB=nets["G_AB"].config, G_BA=nets["G_BA"].config)
    state = StageState("cyclegan", out, nets["G_AB"], dict(nets=nets, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g,
                                                          sched_d=sched_d, pool_a=pool_a, pool_b=pool_b),
                       args, split, size, config=config, score="dice_gain")
    start = state.restore(resume) if resume else 0

    logs, logger = open_run_logs(out, args, split, dict(kind="cyclegan", network=config, teacher=args.teacher))
    logger.info("cyclegan: %d unlabelled (A), %d labelled (B), %d val images at %s on %s%s", len(unlabeled),
                len(labeled), len(val_images), size, device, f", resumed at step {start}" if start else "")
    seed_a = derive_seed(args.seed, "unlabeled")   # A and B batches walk independent permutations

    def train_step(step):
        idx_a = batch_indices(len(unlabeled), args.batch_size, seed_a, step)
        idx_b = batch_indices(len(labeled), args.batch_size, args.seed, step)
        xa, _ = augment_geometry(unlabeled[idx_a].to(device), None, step_generator(args.seed, step, "unlabeled"))
        xb, yb = augment_geometry(labeled[idx_b].to(device), labels[idx_b].to(device),
                                  step_generator(args.seed, step, "labeled"))
        with autocast(args, device):
            qa = teacher_pseudo_labels(teacher, xa)
        yb = yb[:, None].float()

        nets["D_A"].requires_grad_(False)
        nets["D_B"].requires_grad_(False)
        with autocast(args, device):
            loss_g, fake_a, fake_b, parts = generator_loss(nets, xa, qa, xb, yb, args.cycle_weight,
                                                           args.identity_weight)
        value_g = check_finite(loss_g, "generator loss")
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        nets["D_A"].requires_grad_(True)
        nets["D_B"].requires_grad_(True)
        fake_a = pool_a.query(fake_a, step_generator(args.seed, step, "pool_a"))
        fake_b = pool_b.query(fake_b, step_generator(args.seed, step, "pool_b"))
        with autocast(args, device):
            loss_d = discriminator_loss(nets, pair(xa, qa), pair(xb, yb), fake_a, fake_b)
        value_d = check_finite(loss_d, "discriminator loss")
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        sched_g.step()
        sched_d.step()
        return dict(g=value_g, d=value_d, **{k: v.item() for k, v in parts.items()})

    def validate():
        refined = refine_all(nets["G_AB"], val_images, val_teacher, device)
        metrics = {f"teacher_{k}": v for k, v in teacher_metrics.items()}
        metrics.update({f"refined_{k}": v for k, v in mask_metrics(refined, val_masks).items()})
        metrics["dice_gain"] = metrics["refined_dice"] - metrics["teacher_dice"]
        return metrics

    if start == 0:
        state.save(0, validate())   # the untrained residual G_AB is the teacher: the baseline to beat
    run_steps(desc="cyclegan", steps=args.steps, start_step=start, val_every=args.val_every, train_step=train_step,
              validate=validate, save=state.save, checkpoint_path=out, logger=logger, saved_at_start=True)
    m = state.best["metrics"]
    print(f"{out}: validation, teacher -> refined (best step {state.best['step']}): "
          f"Dice {m['teacher_dice']:.4f} -> {m['refined_dice']:.4f}, "
          f"HD95 {m['teacher_hd95']:.2f} -> {m['refined_hd95']:.2f} px; logs in {logs}/")


if __name__ == "__main__":
    main()
