"""Stage 2: train SinusCycle-GAN, the unpaired refiner of the teacher's pseudo labels (SPEC section 5).

Reads --data and the frozen --teacher (whose split and input size it inherits); writes the
checkpoint --out, holding the refiner G_AB whose refinement gains most validation Dice over the
teacher, and <out stem>_logs/ beside it.

Domain A: unlabelled images xu with the teacher's foreground probability qT(xu); domain B:
labelled images xl with their expert masks yl. G_AB(x, q) returns a refined foreground logit r,
G_BA(x, y) a teacher-like soft mask; the discriminators D_A, D_B judge (image, mask) pairs.

Design: each generator is residual by default: it returns the logit of its input mask plus a
correction whose last layer starts at zero, so an untrained G_AB returns the teacher's own
prediction, and the checkpoint is validated at step 0 too. Refinement therefore starts from the
teacher and the kept G_AB is never worse on validation than no refinement at all. Without it
(--no-residual) the generator must first learn to copy its input mask; with small networks and
short schedules on the phantom it collapsed to an all-background mask (refined val Dice 0.06
against the teacher's 0.83 at 64x128, widths 8/16, 400 steps), while with longer schedules it
recovered and reached the same peak as the residual design.
"""
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from data import Geometry, augment_geometry, batch_indices, derive_seed, prepare_dataset, step_generator, strengths
from data.check import upstream_dataset
from engine.cli import Training, autocast, memory_format, parse, select_device, setting, writable_file
from engine.distributed import Distributed, join
from engine.loop import check_finite, constant_then_linear, predict_logits, run_steps
from engine.metrics import overlap_metrics, summarize
from engine.records import open_run_logs
from engine.state import StageState, load_network, resume_from, seed_stage, upstream_size
from errors import UserError, exit_on_user_error
from kernels import boundary_metrics
from nets.cyclegan import PatchDiscriminator, ResnetGenerator, foreground_probability


@dataclasses.dataclass
class CycleGANSettings(Training):
    out: Path = setting(Path("cyclegan.pt"), "checkpoint to write (logs go to a folder beside it)")
    teacher: Path | None = setting(None, "teacher checkpoint whose pseudo labels to refine", required=True)
    lr: float = setting(2e-4, "learning rate of both Adam optimisers (betas 0.5, 0.999)", within="(0, inf)")
    width: int = setting(16, "generator channels at full resolution", within="[1, inf)")
    blocks: int = setting(4, "residual blocks in each generator", within="[1, inf)")
    residual: bool = setting(True, "generators add the logit of their input mask to their output, so they start "
                                   "as the identity (see the description above)")
    disc_width: int = setting(16, "discriminator channels in its first layer", within="[1, inf)")
    cycle_weight: float = setting(10.0, "weight of the cycle-consistency L1 losses", within="[0, inf)")
    identity_weight: float = setting(5.0, "weight of the identity L1 G_AB(xl, yl) ~ yl", within="[0, inf)")
    pool_size: int = setting(50, "fakes kept in each discriminator's history pool (0: none)", within="[0, inf)")
    decay_start: float = setting(0.5, "fraction of --steps after which the learning rate decays linearly to 0",
                                 within="[0, 1]")
    binarize: bool = setting(True, "discriminators see every mask thresholded at 0.5 (straight-through), so that "
                                   "soft fakes cannot be told from binary real masks by softness alone")
    d_augment: bool = setting(True, "discriminators see real and fake pairs alike randomly translated and cut out "
                                    "(DiffAugment), so that they cannot memorise the few real masks")


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


def lsgan(scores: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(scores, torch.full_like(scores, float(real)))


def pair(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([image, mask], dim=1)


@torch.no_grad()
def teacher_pseudo_labels(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Domain A's mask channel qT(xu); the teacher is a fixed input, never trained here."""
    return foreground_probability(teacher(images))


def straight_through_binary(mask: torch.Tensor) -> torch.Tensor:
    """The mask thresholded at 0.5 in the forward pass, the identity in the backward pass."""
    return mask + ((mask > 0.5).to(mask.dtype) - mask).detach()


def diff_augment(pairs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random translation (up to 1/8 of each side, zero fill) and a cutout (half of each side) per
    pair, applied alike to real and fake pairs; differentiable in the pairs' values."""
    n, _, h, w = pairs.shape
    shift = ((torch.rand(n, 2, generator=g) * 2 - 1) * torch.tensor([h / 8, w / 8])).round().long()
    corner = (torch.rand(n, 2, generator=g) * torch.tensor([h - h // 2 + 1, w - w // 2 + 1])).long()
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    src_r, src_c = rows - shift[:, 0, None, None], cols - shift[:, 1, None, None]
    inside = (src_r >= 0) & (src_r < h) & (src_c >= 0) & (src_c < w)
    index = (src_r.clamp(0, h - 1) * w + src_c.clamp(0, w - 1)).to(pairs.device)
    moved = pairs.flatten(2).gather(2, index.flatten(1)[:, None].expand(-1, pairs.shape[1], -1)).view_as(pairs)
    hole = ((rows >= corner[:, 0, None, None]) & (rows < corner[:, 0, None, None] + h // 2)
            & (cols >= corner[:, 1, None, None]) & (cols < corner[:, 1, None, None] + w // 2))
    return moved * (inside & ~hole)[:, None].to(pairs.device, pairs.dtype)


class Judge:
    """What a discriminator sees of (image, mask) pairs: see --binarize and --d-augment."""

    def __init__(self, binarize: bool, augment: bool):
        self.binarize, self.augment = binarize, augment

    def __call__(self, discriminator, pairs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.binarize:
            pairs = torch.cat([pairs[:, :1], straight_through_binary(pairs[:, 1:])], dim=1)
        return discriminator(diff_augment(pairs, g) if self.augment else pairs)


def generator_loss(nets, judge, xa, qa, xb, yb, cycle_weight: float, identity_weight: float, g):
    """LSGAN + cycle L1 + identity L1 for both generators -> (loss, fake A pair, fake B pair, parts)."""
    fake_b = torch.sigmoid(nets["G_AB"](pair(xa, qa)))           # refined pseudo label of xu
    fake_a = torch.sigmoid(nets["G_BA"](pair(xb, yb)))           # teacher-like mask of xl
    cycle_a = torch.sigmoid(nets["G_BA"](pair(xa, fake_b)))
    cycle_b = torch.sigmoid(nets["G_AB"](pair(xb, fake_a)))
    same_b = torch.sigmoid(nets["G_AB"](pair(xb, yb)))
    adversarial = lsgan(judge(nets["D_B"], pair(xa, fake_b), g), True) \
        + lsgan(judge(nets["D_A"], pair(xb, fake_a), g), True)
    cycle = F.l1_loss(cycle_a, qa) + F.l1_loss(cycle_b, yb)
    identity = F.l1_loss(same_b, yb)
    loss = adversarial + cycle_weight * cycle + identity_weight * identity
    parts = dict(adv=adversarial.detach(), cycle=cycle.detach(), idt=identity.detach())
    return loss, pair(xb, fake_a).detach(), pair(xa, fake_b).detach(), parts


def discriminator_loss(nets, judge, real_a, real_b, fake_a, fake_b, g):
    return 0.5 * (lsgan(judge(nets["D_A"], real_a, g), True) + lsgan(judge(nets["D_A"], fake_a, g), False)
                  + lsgan(judge(nets["D_B"], real_b, g), True) + lsgan(judge(nets["D_B"], fake_b, g), False))


def mask_metrics(logits: torch.Tensor, masks: torch.Tensor) -> dict:
    """Mean Dice and HD95 (pixels at training size; over the cases where it is defined) of argmax, and
    the cases where HD95 is undefined; with several classes, the mean of each over the classes."""
    per_class = []
    for c in range(1, logits.shape[1]):
        pred, target = logits.argmax(1) == c, masks == c
        hd95 = boundary_metrics(pred, target)["hd95"]
        per_class.append(dict(dice=overlap_metrics(pred, target)["dice"].mean().item(),
                              hd95=summarize(hd95.tolist())["mean"], hd95_undefined=float(hd95.isnan().sum())))
    return {k: sum(m[k] for m in per_class) / len(per_class) for k in per_class[0]}


class CycleGAN:
    """The four networks, their optimisers, schedules and history pools, and one training step.

    Under torchrun each network is data parallel; the discriminators are called unwrapped while
    the generators learn (their weights get no gradient then), and the history pools take the
    fakes of all ranks, so that every rank holds the same pool and rank 0's checkpoint resumes all.
    """

    def __init__(self, s: CycleGANSettings, device: torch.device, ddp: Distributed = Distributed()):
        self.s, self.device, self.ddp = s, device, ddp
        self.nets = torch.nn.ModuleDict(dict(
            G_AB=ResnetGenerator(width=s.width, blocks=s.blocks, residual=s.residual),
            G_BA=ResnetGenerator(width=s.width, blocks=s.blocks, residual=s.residual),
            D_A=PatchDiscriminator(width=s.disc_width), D_B=PatchDiscriminator(width=s.disc_width)))
        self.nets.to(device, memory_format=memory_format(s.channels_last))
        self.parallel = {name: ddp.wrap(net) for name, net in self.nets.items()}
        generators = [*self.nets["G_AB"].parameters(), *self.nets["G_BA"].parameters()]
        discriminators = [*self.nets["D_A"].parameters(), *self.nets["D_B"].parameters()]
        self.opt_g = torch.optim.Adam(generators, lr=s.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(discriminators, lr=s.lr, betas=(0.5, 0.999))
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, constant_then_linear(s.steps, s.decay_start))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, constant_then_linear(s.steps, s.decay_start))
        self.pool_a, self.pool_b = HistoryPool(s.pool_size, device), HistoryPool(s.pool_size, device)
        self.judge = Judge(s.binarize, s.d_augment)

    def modules(self) -> dict:
        """Everything whose state --resume needs."""
        return dict(nets=self.nets, opt_g=self.opt_g, opt_d=self.opt_d, sched_g=self.sched_g,
                    sched_d=self.sched_d, pool_a=self.pool_a, pool_b=self.pool_b)

    def train_step(self, xa, qa, xb, yb, generators) -> dict:
        """One generator update, then one discriminator update on pooled fakes; `generators` holds
        the step's random streams: the two pools', then the discriminators' augmentation's."""
        s, nets, device, ddp = self.s, self.nets, self.device, self.ddp
        nets["D_A"].requires_grad_(False)
        nets["D_B"].requires_grad_(False)
        learning = dict(self.parallel, D_A=nets["D_A"], D_B=nets["D_B"])
        with autocast(s.precision, device):
            loss_g, fake_a, fake_b, parts = generator_loss(learning, self.judge, xa, qa, xb, yb, s.cycle_weight,
                                                           s.identity_weight, generators[2])
        value_g = check_finite(loss_g, "generator loss")
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()

        nets["D_A"].requires_grad_(True)
        nets["D_B"].requires_grad_(True)
        fake_a = ddp.share(self.pool_a.query(ddp.gather(fake_a), generators[0]))
        fake_b = ddp.share(self.pool_b.query(ddp.gather(fake_b), generators[1]))
        with autocast(s.precision, device):
            loss_d = discriminator_loss(self.parallel, self.judge, pair(xa, qa), pair(xb, yb), fake_a, fake_b,
                                        generators[2])
        value_d = check_finite(loss_d, "discriminator loss")
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        self.sched_g.step()
        self.sched_d.step()
        return dict(g=value_g, d=value_d, **{k: v.item() for k, v in parts.items()})


@exit_on_user_error
def main(argv=None):
    s = parse(CycleGANSettings, __doc__, argv)
    ddp, device = join(select_device(s.device))
    out = writable_file(s.out)
    root = prepare_dataset(s.data)
    teacher, teacher_ckpt = load_network(s.teacher, ("teacher",), "--teacher", device)
    size = upstream_size(s.size, teacher_ckpt, "--teacher", s.teacher)
    dataset, split, fingerprint = upstream_dataset(root, teacher_ckpt, "--teacher", s.teacher)
    if not split["unlabeled"]:
        raise UserError(f"--teacher {s.teacher}: its split has no unlabelled images to refine; retrain the "
                        f"teacher with --labeled-ratio below 1")
    resume = resume_from(out, "cyclegan", s)
    run_seed = seed_stage(s.seed, "cyclegan", s.deterministic)

    unlabeled, _ = dataset.tensors(split["unlabeled"], size, with_masks=False)
    labeled, labels = dataset.tensors(split["labeled"], size)
    val_images, val_masks = dataset.tensors(split["val"], size)
    teacher_metrics = mask_metrics(predict_logits(teacher, val_images, device), val_masks)

    gan = CycleGAN(s, device, ddp)
    config = dict(G_AB=gan.nets["G_AB"].config, G_BA=gan.nets["G_BA"].config)
    state = StageState("cyclegan", out, gan.nets["G_AB"], gan.modules(), s, split, size, config=config,
                       score="dice_gain", extra=dict(classes=dataset.classes.record(), data_fingerprint=fingerprint))
    start = state.restore(resume) if resume else 0
    geometry = strengths(Geometry, s, "aug_")

    logs, logger = open_run_logs(out, s, split, dict(kind="cyclegan", network=config, processes=ddp.world,
                                                     global_batch=s.batch_size * ddp.world), ddp.is_main)
    logger.info("cyclegan: %d unlabelled (A), %d labelled (B), %d val images at %s on %s, global batch %d%s",
                len(unlabeled), len(labeled), len(val_images), size, device, s.batch_size * ddp.world,
                f", resumed at step {start}" if start else "")
    seed_a = derive_seed(run_seed, "unlabeled")   # A and B batches walk independent permutations

    def train_step(step):
        batch = s.batch_size * ddp.world            # every rank draws the global batch and keeps its share
        idx_a = batch_indices(len(unlabeled), batch, seed_a, step)
        idx_b = batch_indices(len(labeled), batch, run_seed, step)
        xa, _ = augment_geometry(unlabeled[idx_a].to(device), None, step_generator(run_seed, step, "unlabeled"),
                                 geometry)
        xb, yb = augment_geometry(labeled[idx_b].to(device), labels[idx_b].to(device),
                                  step_generator(run_seed, step, "labeled"), geometry)
        xa, xb, yb = ddp.share(xa), ddp.share(xb), ddp.share(yb)
        with autocast(s.precision, device):
            qa = teacher_pseudo_labels(teacher, xa)
        streams = [step_generator(run_seed, step, name) for name in ("pool_a", "pool_b", "judge")]
        return gan.train_step(xa, qa, xb, (yb > 0)[:, None].float(), streams)   # B's mask: the foreground

    def validate():
        refined = predict_logits(teacher, val_images, device, refiner=gan.nets["G_AB"])
        metrics = {f"teacher_{k}": v for k, v in teacher_metrics.items()}
        metrics.update({f"refined_{k}": v for k, v in mask_metrics(refined, val_masks).items()})
        metrics["dice_gain"] = metrics["refined_dice"] - metrics["teacher_dice"]
        return metrics

    if start == 0 and ddp.is_main:
        state.save(0, validate())   # the untrained residual G_AB is the teacher: the baseline to beat
    run_steps(desc="cyclegan", steps=s.steps, start_step=start, val_every=s.val_every, train_step=train_step,
              validate=validate, save=state.save, checkpoint_path=out, logger=logger, saved_at_start=True,
              writer=ddp.is_main)
    if not ddp.is_main:
        return
    m = state.best["metrics"]
    print(f"{out}: validation, teacher -> refined (best step {state.best['step']}): "
          f"Dice {m['teacher_dice']:.4f} -> {m['refined_dice']:.4f}, "
          f"HD95 {m['teacher_hd95']:.2f} -> {m['refined_hd95']:.2f} px; logs in {logs}/")


if __name__ == "__main__":
    main()
