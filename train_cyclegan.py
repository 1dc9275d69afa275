"""Stage 2: train SinusCycle-GAN, the unpaired refiner of the teacher's pseudo labels (SPEC section 5).

Reads --data and the frozen --teacher (whose split and input size it inherits); writes the
checkpoint --out holding the refiner G_AB, and <out stem>_logs/ beside it.

Domain A: unlabelled images xu with the teacher's foreground map qT(xu) = sigmoid(zT / T); domain
B: labelled images xl with their expert masks yl. G_AB(x, q) returns a refined foreground logit,
G_BA(x, y) a teacher-like one; D_B judges refined maps against expert masks, D_A teacher-like
maps against the teacher's. By default the discriminators see the mask alone (--disc-input
mask) through a receptive field of about one sinus lobe (--disc-layers), binarised in the
forward pass and both sides randomly translated alike; the few real masks are also deformed
(flips, affine and elastic, --real-deform) so that the discriminator cannot memorise them. The
losses: least squares adversarial, cycle L1 and identity L1 on the generators' maps, and with
--fidelity-weight an L1 of G_AB's map to the teacher's, which keeps the refiner from moving a
whole mask's area where the few expert masks do not support it.

The specified design (SPEC section 5) is `--disc-input pair --disc-layers 3 --adversarial-weight 1
--cycle-weight 10 --identity-weight 5 --real-deform 0 --lr 2e-4`.

The refiner G_AB written to --out is the trained one, always: the paper applies SinusCycle-GAN
to every pseudo label. With --keep best it is the generator of the best validation check after
the first (the untrained generator at step 0 is the baseline, never a candidate), with --keep
final the last; with --average, the running average of G_AB's weights stands for G_AB at every
check. The checkpoint also records the keep rule's verdict on it (`keep_rule`): whether its
per-case validation Dice gain over the teacher has a 95 % lower bound above zero and its mean
HD95 is not worse. `train_student.py --refiner-gate` uses that verdict to distil from the
teacher's own logits where the rule fails; nothing else does.

Settings: the block below, on the shared ones of settings.py (Training).
"""
import copy
import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from data import Geometry, augment_geometry, batch_indices, derive_seed, prepare_dataset, step_generator, strengths
from data.check import upstream_dataset
from engine.cli import autocast, memory_format, parse, select_device, setting, training_backends, writable_file
from engine.distributed import Distributed, join
from engine.loop import check_finite, constant_then_linear, finite_values, predict_logits, run_steps
from engine.metrics import overlap_metrics
from engine.networks import load_network
from engine.records import open_run_logs
from engine.state import StageState, resume_from, seed_stage, weights_copy, weights_sha256
from errors import UserError, exit_on_user_error
from kernels import boundary_metrics
from nets.cyclegan import PatchDiscriminator, ResnetGenerator, foreground_logit, refine_logits
from settings import Training

# How the real masks shown to D_B are deformed, besides the labelled images' own augmentation.
REAL_DEFORM = Geometry(rotate=10.0, scale=(0.85, 1.15), shift=0.05, flip=0.5)
ELASTIC_GRID = (4, 8)         # coarse displacement grid (rows, columns), upsampled smoothly


@dataclasses.dataclass
class CycleGANSettings(Training):
    out: Path = setting(Path("cyclegan.pt"), "checkpoint to write (logs go to a folder beside it)")
    teacher: Path | None = setting(None, "teacher checkpoint whose pseudo labels to refine", required=True)
    lr: float = setting(2e-4, "learning rate of both Adam optimisers (betas 0.5, 0.999; SPEC section 5: 2e-4)",
                        within="(0, inf)")
    width: int = setting(16, "generator channels at full resolution", within="[1, inf)")
    blocks: int = setting(4, "residual blocks in each generator", within="[1, inf)")
    map_temperature: float = setting(4.0, "temperature T at which the teacher's logits become the map qT",
                                     within="(0, inf)")
    disc_input: str = setting("mask", "what the discriminators judge: the mask alone, or the (image, mask) pair "
                                      "(SPEC section 5)", choices=("mask", "pair"))
    disc_width: int = setting(16, "discriminator channels in its first layer", within="[1, inf)")
    disc_layers: int = setting(2, "discriminator depth; receptive field 16, 34, 70 px for 1, 2, 3 (about one "
                                  "sinus lobe is the aim; SPEC section 5: 3)", within="[1, 5]")
    adversarial_weight: float = setting(3.0, "weight of the adversarial losses (SPEC section 5: 1)", within="[0, inf)")
    cycle_weight: float = setting(1.0, "weight of the cycle-consistency L1 losses (SPEC section 5: 10)",
                                  within="[0, inf)")
    identity_weight: float = setting(1.0, "weight of the identity L1 G_AB(xl, yl) ~ yl (SPEC section 5: 5)",
                                     within="[0, inf)")
    fidelity_weight: float = setting(1.0, "weight of the fidelity L1 G_AB(xu, qT) ~ qT, which holds the refined map "
                                          "near the teacher's where the adversarial loss gains little (not in SPEC)",
                                     within="[0, inf)")
    real_deform: float = setting(1.0, "elastic displacement of the real masks shown to D_B, in pixels (0: none, "
                                      "and no flip or affine either)", within="[0, inf)")
    keep: str = setting("final", "the refiner written: the best validation check's after step 0, or the final one",
                        choices=("best", "final"))
    average: float = setting(0.99, "decay of the running average of G_AB's weights used at every check and written "
                                  "(0: none, the trained weights themselves)", within="[0, 1)")
    pool_size: int = setting(50, "fakes kept in each discriminator's history pool (0: none)", within="[0, inf)")
    decay_start: float = setting(0.5, "fraction of --steps after which the learning rate decays linearly to 0",
                                 within="[0, 1]")


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
def teacher_map(teacher: torch.nn.Module, images: torch.Tensor, temperature: float) -> torch.Tensor:
    """Domain A's mask channel qT(xu) = sigmoid(zT / T); the teacher is a fixed input, never trained here."""
    return torch.sigmoid(foreground_logit(teacher(images)) / temperature)


def straight_through_binary(mask: torch.Tensor) -> torch.Tensor:
    """The mask thresholded at 0.5 in the forward pass, the identity in the backward pass."""
    return mask + ((mask > 0.5).to(mask.dtype) - mask).detach()


def translate(maps: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each map shifted by up to 1/8 of each side with zero fill (DiffAugment's translation), so the
    discriminators cannot key on where a mask sits; differentiable in the values."""
    n, _, h, w = maps.shape
    shift = ((torch.rand(n, 2, generator=g) * 2 - 1) * torch.tensor([h / 8, w / 8])).round().long()
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    src_r, src_c = rows - shift[:, 0, None, None], cols - shift[:, 1, None, None]
    inside = (src_r >= 0) & (src_r < h) & (src_c >= 0) & (src_c < w)
    index = (src_r.clamp(0, h - 1) * w + src_c.clamp(0, w - 1)).to(maps.device)
    moved = maps.flatten(2).gather(2, index.flatten(1)[:, None].expand(-1, maps.shape[1], -1)).view_as(maps)
    return moved * inside[:, None].to(maps.device, maps.dtype)


def deform_masks(masks: torch.Tensor, g: torch.Generator, pixels: float) -> torch.Tensor:
    """Binary (N, 1, H, W) masks flipped, rotated, scaled and shifted (REAL_DEFORM), then displaced
    by a smooth random field of up to `pixels`: new plausible expert masks from the few there are."""
    if pixels == 0:
        return masks
    n, _, h, w = masks.shape
    _, moved = augment_geometry(masks, masks[:, 0].long(), g, REAL_DEFORM)
    field = (torch.rand(n, 2, *ELASTIC_GRID, generator=g) * 2 - 1) * pixels
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    base = torch.stack(torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")[::-1], -1)
    grid = base + field * torch.tensor([2 / w, 2 / h])       # pixels -> normalised (x, y)
    out = F.grid_sample(moved[:, None].float(), grid.to(masks.device), mode="bilinear", align_corners=True)
    return (out > 0.5).to(masks.dtype)


@dataclasses.dataclass
class StepStreams:
    """The random streams of one refiner step, each a generator of its own."""
    pool_a: torch.Generator     # which fakes D_A's history pool hands back
    pool_b: torch.Generator     # which fakes D_B's history pool hands back
    view: torch.Generator       # the translation of what the discriminators see (DiscriminatorView)
    deform: torch.Generator     # the deformation of the expert masks D_B takes as real

    @classmethod
    def of_step(cls, seed: int, step: int) -> "StepStreams":
        # a stream's label is part of its seed: "judge" keeps the view's draws those of every recorded run
        return cls(*(step_generator(seed, step, label) for label in ("pool_a", "pool_b", "judge", "deform")))


class DiscriminatorView:
    """What a discriminator sees: the mask binarised (straight-through) and translated, alone or with
    its image (--disc-input)."""

    def __init__(self, with_image: bool):
        self.with_image = with_image

    def __call__(self, discriminator, image: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        seen = straight_through_binary(mask)
        return discriminator(translate(pair(image, seen) if self.with_image else seen, g))


def generator_loss(nets, view, xa, qa, xb, yb, s, g):
    """LSGAN + cycle L1 + identity L1 (+ fidelity L1) of both generators on their maps -> (loss, fake A, fake B,
    parts)."""
    def through(name, image, mask):
        return torch.sigmoid(nets[name](pair(image, mask)))
    fake_b = through("G_AB", xa, qa)                 # refined pseudo label of xu
    fake_a = through("G_BA", xb, yb)                 # teacher-like map of xl
    cycle = F.l1_loss(through("G_BA", xa, fake_b), qa) + F.l1_loss(through("G_AB", xb, fake_a), yb)
    identity = F.l1_loss(through("G_AB", xb, yb), yb)
    fidelity = F.l1_loss(fake_b, qa)
    adversarial = lsgan(view(nets["D_B"], xa, fake_b, g), True) + lsgan(view(nets["D_A"], xb, fake_a, g), True)
    loss = (s.adversarial_weight * adversarial + s.cycle_weight * cycle + s.identity_weight * identity
            + s.fidelity_weight * fidelity)
    parts = dict(adv=adversarial.detach(), cycle=cycle.detach(), idt=identity.detach(), fid=fidelity.detach())
    return loss, fake_a.detach(), fake_b.detach(), parts


def discriminator_loss(nets, view, xa, qa, xb, real_b, fake_a, fake_b, g):
    """D_A: the teacher's maps real, G_BA's fakes; D_B: (deformed) expert masks real, G_AB's fakes.
    The fakes are pooled (image, map) pairs."""
    return 0.5 * (lsgan(view(nets["D_A"], xa, qa, g), True) + lsgan(view(nets["D_A"], *fake_a.split(1, 1), g), False)
                  + lsgan(view(nets["D_B"], xb, real_b, g), True)
                  + lsgan(view(nets["D_B"], *fake_b.split(1, 1), g), False))


def dice_and_hd95_per_case(logits: torch.Tensor, masks: torch.Tensor) -> dict:
    """Per-case Dice and HD95 (pixels at training size; NaN where undefined) of the argmax, each the
    mean over the classes with several."""
    dice, hd95 = [], []
    for c in range(1, logits.shape[1]):
        pred, target = logits.argmax(1) == c, masks == c
        dice.append(overlap_metrics(pred, target)["dice"].double().cpu())
        hd95.append(boundary_metrics(pred, target)["hd95"].double().cpu())
    return dict(dice=torch.stack(dice).mean(0).numpy(), hd95=torch.stack(hd95).mean(0).numpy())


def refinement_gain(teacher: dict, refined: dict) -> dict:
    """Validation means, the paired Dice gain with its 95 % t lower bound over the cases, and the keep
    rule's verdict on the refinement (`passes`: 1.0 or 0.0)."""
    gain = refined["dice"] - teacher["dice"]
    both = np.isfinite(teacher["hd95"]) & np.isfinite(refined["hd95"])
    n = len(gain)
    low = float(gain.mean() - stats.t.ppf(0.975, n - 1) * gain.std(ddof=1) / math.sqrt(n)) if n > 1 else -math.inf
    out = dict(teacher_dice=float(teacher["dice"].mean()), refined_dice=float(refined["dice"].mean()),
               teacher_hd95=float(teacher["hd95"][both].mean()) if both.any() else math.nan,
               refined_hd95=float(refined["hd95"][both].mean()) if both.any() else math.nan,
               dice_gain=float(gain.mean()), dice_gain_low=0.0 if not gain.any() else low)
    out["passes"] = float(not keep_rule_failures(out))
    return out


def keep_rule_failures(gain: dict) -> list:
    """What the keep rule finds wrong with a refinement: its Dice gain's 95 % lower bound is not above
    zero, or its mean HD95 is worse than the teacher's or undefined on every validation case."""
    failures = []
    if not gain["dice_gain_low"] > 0:
        failures.append(f"the Dice gain's lower bound {gain['dice_gain_low']:+.4f} is not above 0")
    if not math.isfinite(gain["refined_hd95"]):
        failures.append("HD95 is undefined on every validation case")
    elif gain["refined_hd95"] > gain["teacher_hd95"]:
        failures.append(f"HD95 is worse ({gain['teacher_hd95']:.2f} -> {gain['refined_hd95']:.2f} px)")
    return failures


def average_into(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """One step of the running average of a generator's weights (Polyak averaging): the average
    moves a (1 - decay) part of the way to the current weights."""
    with torch.no_grad():
        for a, p in zip(average.parameters(), model.parameters()):
            a.lerp_(p, 1.0 - decay)


class CycleGAN:
    """The four networks, their optimisers, schedules and history pools, and one training step.

    Under torchrun each network is data parallel; the discriminators are called unwrapped while
    the generators learn (their weights get no gradient then), and the history pools take the
    fakes of all ranks, so that every rank holds the same pool and rank 0's checkpoint resumes all.
    """

    def __init__(self, s: CycleGANSettings, device: torch.device, ddp: Distributed = Distributed()):
        self.s, self.device, self.ddp = s, device, ddp
        disc_in = 2 if s.disc_input == "pair" else 1
        self.nets = torch.nn.ModuleDict(dict(
            G_AB=ResnetGenerator(width=s.width, blocks=s.blocks, map_temperature=s.map_temperature),
            G_BA=ResnetGenerator(width=s.width, blocks=s.blocks, map_temperature=s.map_temperature),
            D_A=PatchDiscriminator(disc_in, width=s.disc_width, layers=s.disc_layers),
            D_B=PatchDiscriminator(disc_in, width=s.disc_width, layers=s.disc_layers)))
        self.nets.to(device, memory_format=memory_format(s.channels_last))
        self.parallel = {name: ddp.wrap(net) for name, net in self.nets.items()}
        generators = [*self.nets["G_AB"].parameters(), *self.nets["G_BA"].parameters()]
        discriminators = [*self.nets["D_A"].parameters(), *self.nets["D_B"].parameters()]
        self.opt_g = torch.optim.Adam(generators, lr=s.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(discriminators, lr=s.lr, betas=(0.5, 0.999))
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, constant_then_linear(s.steps, s.decay_start))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, constant_then_linear(s.steps, s.decay_start))
        self.pool_a, self.pool_b = HistoryPool(s.pool_size, device), HistoryPool(s.pool_size, device)
        self.view = DiscriminatorView(s.disc_input == "pair")
        # the refiner that is validated and written: G_AB itself, or the running average of its weights
        self.refiner = copy.deepcopy(self.nets["G_AB"]).requires_grad_(False) if s.average else self.nets["G_AB"]

    def modules(self) -> dict:
        """Everything whose state --resume needs."""
        modules = dict(nets=self.nets, opt_g=self.opt_g, opt_d=self.opt_d, sched_g=self.sched_g,
                       sched_d=self.sched_d, pool_a=self.pool_a, pool_b=self.pool_b)
        return modules | (dict(average=self.refiner) if self.s.average else {})

    def train_step(self, xa, qa, xb, yb, streams: StepStreams) -> dict:
        """One generator update, then one discriminator update on pooled fakes, drawing from the
        step's `streams`."""
        s, nets, device, ddp = self.s, self.nets, self.device, self.ddp
        nets["D_A"].requires_grad_(False)
        nets["D_B"].requires_grad_(False)
        learning = dict(self.parallel, D_A=nets["D_A"], D_B=nets["D_B"])
        with autocast(s.precision, device):
            loss_g, fake_a, fake_b, parts = generator_loss(learning, self.view, xa, qa, xb, yb, s, streams.view)
        # the parts are read with the loss, while the device has nothing else queued
        parts = finite_values({"generator loss": loss_g, **parts})
        value_g = parts.pop("generator loss")
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        if s.average:
            average_into(self.refiner, nets["G_AB"], s.average)

        nets["D_A"].requires_grad_(True)
        nets["D_B"].requires_grad_(True)
        # the pools hold (image, map) pairs, so that a pooled fake keeps its own image
        fake_a = ddp.share(self.pool_a.query(ddp.gather(pair(xb, fake_a)), streams.pool_a))
        fake_b = ddp.share(self.pool_b.query(ddp.gather(pair(xa, fake_b)), streams.pool_b))
        real_b = deform_masks(yb, streams.deform, s.real_deform)
        with autocast(s.precision, device):
            loss_d = discriminator_loss(self.parallel, self.view, xa, qa, xb, real_b, fake_a, fake_b, streams.view)
        value_d = check_finite(loss_d, "discriminator loss")
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        self.sched_g.step()
        self.sched_d.step()
        return dict(g=value_g, d=value_d, **parts)


@exit_on_user_error
def main(argv=None):
    s = parse(CycleGANSettings, __doc__, argv)
    ddp, device = join(select_device(s.device))
    out = writable_file(s.out)
    root = prepare_dataset(s.data)
    teacher, teacher_ckpt = load_network(s.teacher, ("teacher",), "--teacher", device)
    size = tuple(teacher_ckpt["size"])
    dataset, split, fingerprint = upstream_dataset(root, teacher_ckpt, "--teacher", s.teacher)
    if not split["unlabeled"]:
        remedy = "list images without a mask under \"unlabeled\" in splits.json" if split.get("labeled_ratio") is None \
            else "add images without masks, or use --labeled-ratio below 1"
        raise UserError(f"--teacher {s.teacher}: its split has no unlabelled images to refine; {remedy}, and "
                        f"train the teacher again")
    resume = resume_from(out, "cyclegan", s)
    run_seed = seed_stage(s.seed, "cyclegan", s.deterministic)
    training_backends(device, s.deterministic)

    unlabeled, _ = dataset.tensors(split["unlabeled"], size, with_masks=False)
    labeled, labels = dataset.tensors(split["labeled"], size)
    val_images, val_masks = dataset.tensors(split["val"], size)
    # on the device once, not a batch at a time (on the CPU they are there already)
    unlabeled, labeled, labels, val_images, val_masks = (t.to(device) for t in (unlabeled, labeled, labels, val_images,
                                                                               val_masks))
    if device.type == "cuda":   # the teacher in the refiner's layout
        teacher.to(memory_format=memory_format(s.channels_last))
    teacher_cases = dice_and_hd95_per_case(predict_logits(teacher, val_images, device), val_masks)

    gan = CycleGAN(s, device, ddp)
    config = dict(G_AB=gan.nets["G_AB"].config, G_BA=gan.nets["G_BA"].config)
    state = StageState("cyclegan", out, gan.refiner, gan.modules(), s, split, size, config=config,
                       score="dice_gain", extra=dict(classes=dataset.classes.record(), data_fingerprint=fingerprint,
                                                     teacher_sha256=weights_sha256(teacher_ckpt["model"])))
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
            qa = teacher_map(teacher, xa, s.map_temperature)
        mask_b = (yb > 0)[:, None].float()           # B's mask: the foreground
        return gan.train_step(xa, qa, xb, mask_b, StepStreams.of_step(run_seed, step))

    def validate():
        refine = functools.partial(refine_logits, gan.refiner)
        refined = dice_and_hd95_per_case(predict_logits(teacher, val_images, device, refine=refine), val_masks)
        return refinement_gain(teacher_cases, refined)

    if start == 0 and ddp.is_main:
        # the untrained G_AB (the teacher) is written as the baseline, below every trained candidate
        state.keep(weights_copy(gan.refiner), 0, validate(), -math.inf)
        state.write(0)
    run_steps(desc="cyclegan", steps=s.steps, start_step=start, val_every=s.val_every, train_step=train_step,
              validate=validate, save=state.save, checkpoint_path=out, logger=logger, saved_at_start=True,
              writer=ddp.is_main)
    if not ddp.is_main:
        return
    state.finish(s.steps)
    refiner = state.best["metrics"]
    failures = keep_rule_failures(refiner)
    verdict = "passes the keep rule" if not failures else "fails the keep rule: " + "; ".join(failures)
    summary = (f"refiner of step {refiner['step']} on validation: Dice {refiner['teacher_dice']:.4f} -> "
               f"{refiner['refined_dice']:.4f} (gain {refiner['dice_gain']:+.4f}, 95 % lower bound "
               f"{refiner['dice_gain_low']:+.4f}), HD95 {refiner['teacher_hd95']:.2f} -> {refiner['refined_hd95']:.2f} "
               f"px; it {verdict}")
    logger.info("%s", summary)
    print(f"{out}: {summary}; logs in {logs}/")


if __name__ == "__main__":
    main()
