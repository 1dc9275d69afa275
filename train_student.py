"""Stage 3: train the student on labelled data plus an unlabelled objective (SPEC section 6).

    L = L_sup(labelled: cross-entropy + soft Dice) + lambda(s) * L_unsup(unlabelled)

Reads --data, the frozen --teacher (whose split and input size it inherits) and, for refined
KD, the --refiner; writes the checkpoint --out (the final weights, or with --keep best those of
the best validation check) and <out stem>_logs/ beside it. --method picks L_unsup from the
objectives in objectives.py; for the KD methods --weight overrides the method's pixel weight,
and --refiner or --postprocess changes the teacher's logits first, so every cell of the
ablation grid is one command.

The student starts from the teacher's weights (--init) and is noised: on each unlabelled image
the teacher (and refiner, or the EMA copy) see the clean view, the student a strongly perturbed
one of the same geometry (stronger photometric changes, blur, a cutout hole), and the student
network has dropout. The labelled and the unlabelled batch go through the student separately,
and only the labelled one updates the BatchNorm running statistics, so that every student, the
supervised control included, is evaluated with statistics of clean labelled images; the
unlabelled pass draws its dropout from a stream of its own. A student with lambda 0 therefore
trains exactly as the supervised control of its seed. Objectives that register a step (bcp,
unimatch) make their passes, mixed inputs included, through that same unlabelled path.

Settings: the block below, on the shared ones of settings.py (Training, LabelledPhotometric).
"""
import contextlib
import copy
import dataclasses
import itertools
from pathlib import Path

import torch

from data import Corruption, Geometry, Photometric, augment_photometric, corrupt, derive_seed, labeled_batch, \
    prepare_dataset, step_generator, strengths, unlabeled_views
from data.check import upstream_dataset
from engine.cli import autocast, memory_format, parse, select_device, setting, training_backends, writable_file
from engine.distributed import join
from engine.loop import finite_values, poly_lr, run_steps, validation_dice
from engine.card import write_model_card
from engine.networks import load_network
from engine.records import open_run_logs
from engine.state import StageState, check_same_experiment, resume_from, seed_stage, weights_sha256
from errors import UserError, exit_on_user_error
from kernels import WEIGHT_MODES
from nets.cyclegan import refine_logits
from nets.postprocess import postprocess_logits
from nets.unet import UNet
from objectives import OBJECTIVES, StepInputs, ema_update, kd_weight, ramp, supervised_loss
from settings import LabelledPhotometric, Training


@dataclasses.dataclass
class StudentSettings(LabelledPhotometric, Training):
    out: Path = setting(Path("student.pt"), "checkpoint to write (logs go to a folder beside it)")
    teacher: Path | None = setting(None, "teacher checkpoint (gives the split and the input size)", required=True)
    refiner: Path | None = setting(None, "SinusCycle-GAN checkpoint that refines the teacher's logits (KD methods)")
    refiner_gate: bool = setting(False, "apply --refiner only where its keep rule passed on validation; else distil "
                                        "from the teacher's own logits")
    postprocess: bool = setting(False, "KD methods: distil from the teacher's post-processed logits (each side's "
                                       "largest connected component, holes filled), the refiner's control")
    oracle: str = setting("none", "KD methods, upper bounds only: read the unlabelled split's true masks, which no "
                                  "semi-supervised method has, as the pixel weight (1 where the teacher is right) or "
                                  "as the targets", choices=("none", "weight", "targets"))
    method: str = setting("wkd_refine", "unlabelled objective: " + "; ".join(
        f"{o.name}: {o.summary}" for o in OBJECTIVES.values()), choices=tuple(OBJECTIVES))
    weight: str | None = setting(None, "KD pixel weight; default: the method's", choices=tuple(WEIGHT_MODES))
    weight_window: int = setting(3, "ssim weight: side of the square window, odd (SPEC section 4: 7)",
                                 within="[1, 15]")
    weight_gamma: float = setting(1.0, "ssim weight: exponent applied to the clamped SSIM", within="(0, inf)")
    weight_map_temperature: float = setting(4.0, "ssim weight: temperature of the foreground maps it compares; "
                                                 "above 1 they are softer (SPEC section 4: 1)", within="(0, inf)")
    temperature: float = setting(1.0, "KD softmax temperature", within="(0, inf)")
    lambda_max: float = setting(1.0, "weight of the unlabelled loss after the ramp-up", within="[0, inf)")
    ramp_steps: int = setting(200, "length of the sigmoid-shaped ramp-up of lambda", within="[1, inf)")
    unlabeled_batch_size: int = setting(4, "unlabelled images per step", within="[1, inf)")
    width: int | None = setting(None, "student U-Net width; default: the teacher's", within="[1, inf)")
    aug_flip: float | None = setting(None, "geometric augmentation: probability of a left-right flip; default: the "
                                           "teacher's (so 0 for left and right classes when the teacher had it)",
                                     within="[0, 1]")
    init: str = setting("teacher", "start from the teacher's weights (same width only) or from random ones",
                        choices=("teacher", "scratch"))
    confidence: float = setting(0.95, "pseudo_label, unimatch: minimum probability of a pseudo-labelled pixel "
                                      "used", within="[0, 1]")
    ema_decay: float = setting(0.99, "mean_teacher, bcp: EMA decay of the student's copy (horizon 1 / (1 - decay) "
                                     "steps)", within="[0, 1)")
    dropout: float = setting(0.1, "noised student: channel dropout on the student's decoder inputs", within="[0, 1)")
    strong_gamma: float = setting(0.5, "noised student's view: log-gamma range +-", within="[0, 3]")
    strong_contrast: tuple[float, float] = setting((0.6, 1.4), "noised student's view: contrast factor range",
                                                   within="(0, 10]", metavar=("LOW", "HIGH"))
    strong_brightness: float = setting(0.2, "noised student's view: brightness offset range +-", within="[0, 1]")
    strong_noise: float = setting(0.08, "noised student's view: maximum Gaussian noise sigma", within="[0, 1]")
    strong_blur: float = setting(0.01, "noised student's view: maximum blur sigma, fraction of the image height",
                                 within="[0, 0.2]")
    strong_cutout: float = setting(0.25, "noised student's view: side of one hole per image, fraction of each "
                                         "side (0: none)", within="[0, 1)")


def check_method_flags(s: StudentSettings) -> None:
    method = OBJECTIVES[s.method]
    if method.refine and s.refiner is None:
        raise UserError(f"--method {s.method} needs --refiner cyclegan.pt")
    if method.weight is None and (s.refiner or s.weight or s.postprocess or s.oracle != "none"):
        raise UserError(f"--refiner, --postprocess, --weight and --oracle apply to the KD methods only, not "
                        f"--method {s.method}")
    if s.refiner and s.postprocess:
        raise UserError("--refiner and --postprocess: choose one")
    if s.refiner_gate and not s.refiner:
        raise UserError("--refiner-gate needs --refiner cyclegan.pt")
    if s.weight_window % 2 == 0:
        raise UserError(f"--weight-window {s.weight_window}: the window must be odd, so that it has a centre")


def inherited(teacher_ckpt: dict) -> dict:
    """The settings a student takes from its teacher unless given: the width (which --init teacher
    needs) and the flip augmentation (0 where the classes are sides)."""
    return dict(width=teacher_ckpt["config"]["width"], aug_flip=teacher_ckpt["args"]["aug_flip"])


@contextlib.contextmanager
def running_statistics_kept(model: torch.nn.Module):
    """BatchNorm layers normalise with the batch's statistics and leave their running ones alone."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@contextlib.contextmanager
def own_random_stream(seed: int, device: torch.device):
    """Random draws (dropout) from a stream seeded by `seed`, leaving the global stream untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@exit_on_user_error
def main(argv=None):
    s = parse(StudentSettings, __doc__, argv)
    check_method_flags(s)
    method = OBJECTIVES[s.method]
    weight = kd_weight(s.method, s)
    ddp, device = join(select_device(s.device))
    out = writable_file(s.out)
    root = prepare_dataset(s.data)
    teacher, teacher_ckpt = load_network(s.teacher, ("teacher",), "--teacher", device)
    s = dataclasses.replace(s, **{k: v for k, v in inherited(teacher_ckpt).items() if getattr(s, k) is None})
    dataset, split, fingerprint = upstream_dataset(root, teacher_ckpt, "--teacher", s.teacher)
    size = tuple(teacher_ckpt["size"])
    refiner = None
    if s.refiner:
        refiner, refiner_ckpt = load_network(s.refiner, ("cyclegan",), "--refiner", device)
        check_same_experiment(refiner_ckpt, "--refiner", s.refiner, teacher_ckpt)
        if s.refiner_gate and not refiner_ckpt["metrics"].get("passes"):
            print(f"--refiner-gate: {s.refiner} failed its keep rule on validation; distilling from the "
                  f"teacher's own logits")
            refiner = None
    resume = resume_from(out, "student", s)
    run_seed = seed_stage(s.seed, "student", s.deterministic)
    training_backends(device, s.deterministic)

    images, masks = dataset.tensors(split["labeled"], size)
    unlabeled, truth = None, None
    if method.target is not None:      # an oracle reads the unlabelled masks; nothing else may
        unlabeled, truth = dataset.tensors(split["unlabeled"], size, with_masks=s.oracle != "none")
    val_images, val_masks = dataset.tensors(split["val"], size)
    if unlabeled is not None and len(unlabeled) == 0:
        raise UserError(f"--method {s.method} needs unlabelled images, but the split of --teacher has none")
    # on the device once, not a batch at a time (on the CPU they are there already)
    images, masks, val_images, val_masks = (t.to(device) for t in (images, masks, val_images, val_masks))
    unlabeled = None if unlabeled is None else unlabeled.to(device)
    channels = memory_format(s.channels_last)
    if device.type == "cuda":   # targets in the student's layout: the KD kernels' fast path
        teacher.to(memory_format=channels)
        if refiner is not None:
            refiner.to(memory_format=channels)
    model = UNet(num_classes=dataset.classes.outputs, width=s.width, dropout=s.dropout).to(device,
                                                                                           memory_format=channels)
    if s.init == "teacher":
        if model.config["width"] != teacher.config["width"]:
            raise UserError(f"--init teacher needs --width {teacher.config['width']} (the teacher's)")
        model.load_state_dict(teacher.state_dict())
    net = ddp.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lr(s.steps))
    modules = dict(model=model, optimizer=opt, scheduler=sched)
    ema = None
    if method.target == "ema":
        ema = copy.deepcopy(model).requires_grad_(False)
        modules["ema"] = ema
    state = StageState("student", out, model, modules, s, split, size,
                       extra=dict(method=s.method, weight=weight, refined=refiner is not None, postprocessed=s.postprocess,
                                  oracle=s.oracle, classes=dataset.classes.record(), data_fingerprint=fingerprint,
                                  teacher_sha256=weights_sha256(teacher_ckpt["model"])))
    start = state.restore(resume) if resume else 0
    geometry, photometric = strengths(Geometry, s, "aug_"), strengths(Photometric, s, "aug_")
    strong, corruption = strengths(Photometric, s, "strong_"), strengths(Corruption, s, "strong_")

    logs, logger = open_run_logs(out, s, split, dict(kind="student", network=model.config, weight=weight,
                                                     processes=ddp.world,
                                                     global_batch=(s.batch_size + s.unlabeled_batch_size) * ddp.world),
                                 ddp.is_main)
    logger.info("student %s (weight %s, refined %s, post-processed %s, oracle %s): %d labelled, %d unlabelled, %d "
                "val at %s on %s, global batch %d + %d", s.method, weight, refiner is not None, s.postprocess, s.oracle,
                len(images),
                0 if unlabeled is None else len(unlabeled), len(val_images), size, device, s.batch_size * ddp.world,
                s.unlabeled_batch_size * ddp.world)

    @torch.no_grad()
    def targets(x: torch.Tensor) -> torch.Tensor:
        """The objective's target logits for the clean unlabelled view `x`; on CUDA in the student's
        memory format, which the KD kernels' fast path needs (a refined or post-processed map is
        assembled in another)."""
        with autocast(s.precision, device):
            if method.target == "ema":
                return ema(x)
            logits = teacher(x)
            if refiner is not None:
                logits = refine_logits(refiner, x, logits)
            elif s.postprocess:
                logits = postprocess_logits(x, logits)
        return logits.contiguous(memory_format=channels) if device.type == "cuda" else logits

    def forward(x: torch.Tensor, features=None) -> torch.Tensor:
        x = x.contiguous(memory_format=channels)
        with autocast(s.precision, device):
            return net(x) if features is None else net(x, features=features)

    def unlabelled_passes(step: int):
        """The student's passes on unlabelled (or mixed) images of `step`, the k-th drawing its dropout
        from stream k; the first stream is the one every objective of one pass has always used."""
        count = itertools.count()

        def student(x: torch.Tensor, features=None) -> torch.Tensor:
            k = next(count)
            stream = derive_seed(run_seed, step, "unlabeled", *([k] if k else []))
            with running_statistics_kept(model), own_random_stream(stream, device):
                return forward(x, features)
        return student

    def perturb(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return corrupt(augment_photometric(x, g, strong), g, corruption)

    def train_step(step):
        xl, yl = labeled_batch(images, masks, s.batch_size * ddp.world, run_seed, step, device, geometry,
                               photometric)
        xl, yl = ddp.share(xl), ddp.share(yl)
        sup = supervised_loss(forward(xl), yl, ddp.total)
        checked, logged = {"supervised loss": sup}, {}
        loss = sup
        if unlabeled is not None:
            # The targets come from the clean view xu; the student sees a strongly perturbed one.
            xu, xs, yu = unlabeled_views(unlabeled, s.unlabeled_batch_size * ddp.world, run_seed, step, device,
                                         geometry, strong, corruption, truth)
            xu, xs, yu = ddp.share(xu), ddp.share(xs), None if yu is None else ddp.share(yu)
            unsup = method.unlabelled_term(StepInputs(
                labelled=xl, masks=yl, clean=xu, noised=xs, student=unlabelled_passes(step), targets=targets,
                perturb=perturb, generator=step_generator(run_seed, step, "objective"), settings=s, truth=yu))
            unsup, extra = unsup if isinstance(unsup, tuple) else (unsup, {})
            lam = ramp(step, s.lambda_max, s.ramp_steps)
            checked["unlabelled loss"] = unsup
            logged = dict(extra, **{"lambda": lam})
            loss = sup + lam * unsup
        values = finite_values(checked).values()     # one wait for the device a step
        losses = dict(zip(("sup", "unsup"), values), **logged)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema_update(ema, model, step, s.ema_decay)
        return losses

    run_steps(desc=f"student {s.method}", steps=s.steps, start_step=start, val_every=s.val_every,
              train_step=train_step, validate=lambda: validation_dice(model, val_images, val_masks, device),
              save=state.save, checkpoint_path=out, logger=logger, writer=ddp.is_main)
    if ddp.is_main:
        state.finish(s.steps)
        write_model_card(logs, s, split, dataset.classes, fingerprint, state.best["metrics"], kind="student",
                         checkpoint=out, size=size, code_version=state.version,
                         method=f"{s.method} (KD weight {weight}, refined {refiner is not None}, oracle {s.oracle}, "
                                f"post-processed {s.postprocess})")
        print(f"{out}: validation Dice {state.best['score']:.4f} of the kept weights (step {state.best['step']}, "
              f"--keep {s.keep}); logs in {logs}/")


if __name__ == "__main__":
    main()
