"""Stage 1: train the teacher U-Net on the labelled split (cross-entropy + soft Dice).

Reads --data (drawing the split, or taking splits.json; the classes from classes.json or
--classes), prints the split (where every mask went) and checks every image and mask of the
split before training (the masks of unlabelled and test cases for their format only: no stage
reads their pixels); writes the checkpoint --out with the final weights (or with --keep best
those of the best validation check), the resolved split and classes (which every later stage
inherits) and the full training state for --resume, and <out stem>_logs/ beside it.

Settings: the block below, on the shared ones of settings.py (Training, LabelledPhotometric).
"""
import dataclasses
from pathlib import Path

import torch

from data import Dataset, Geometry, Photometric, dataset_classes, describe_split, from_record, labeled_batch, \
    new_split, observed, prepare_dataset, strengths
from data.check import check_folder, dataset_warnings, verified
from data.dataset import warn
from data.split import PHANTOM_LABELED_RATIO, TEST_FRACTION, VAL_FRACTION
from engine.cli import autocast, check_size, memory_format, parse, select_device, setting, training_backends, \
    writable_file
from engine.distributed import join
from engine.loop import check_finite, poly_lr, run_steps, validation_dice
from engine.records import open_run_logs
from engine.state import StageState, resume_from, seed_stage
from errors import UserError, exit_on_user_error
from nets.unet import UNet
from objectives import supervised_loss
from settings import LabelledPhotometric, Training


@dataclasses.dataclass
class TeacherSettings(LabelledPhotometric, Training):
    out: Path = setting(Path("teacher.pt"), "checkpoint to write (logs go to a folder beside it)")
    size: tuple[int, int] = setting((128, 256), "network input size H W, each a multiple of 16", metavar=("H", "W"))
    labeled_ratio: float | None = setting(None, f"fraction of the masked training ids that keep their labels "
                                                f"(default: 1, every mask is used; {PHANTOM_LABELED_RATIO} on the "
                                                f"generated phantom, whose every case has one; not allowed with a "
                                                f"splits.json, which fixes the labelled set)",
                                          within="(0, 1]")
    test_fraction: float = setting(TEST_FRACTION, "fraction of the masked ids held out for testing", within="(0, 1)")
    val_fraction: float = setting(VAL_FRACTION, "fraction of the masked ids held out for validation", within="(0, 1)")
    width: int = setting(16, "U-Net channels at full resolution (doubles per level)", within="[1, inf)")
    classes: tuple[str, ...] | None = setting(None, "the classes of a dataset without classes.json, as mask values "
                                                    "and names, e.g. 1=left 2=right; default: binary (any one "
                                                    "non-zero mask value is the sinus)", metavar="VALUE=NAME")


@exit_on_user_error
def main(argv=None):
    s = parse(TeacherSettings, __doc__, argv)
    ddp, device = join(select_device(s.device))
    size = check_size(s.size, 2 ** UNet.DEPTH)
    out = writable_file(s.out)
    resume = resume_from(out, "teacher", s)
    root = prepare_dataset(s.data)
    run_seed = seed_stage(s.seed, "teacher", s.deterministic)
    training_backends(device, s.deterministic)
    classes = from_record(resume["classes"]) if resume else dataset_classes(root, s.classes)
    try:
        split = resume["split"] if resume else new_split(root, s.seed, s.labeled_ratio, s.test_fraction,
                                                         s.val_fraction)
    except UserError:
        check_folder(root, classes)      # a folder the split cannot be drawn from: name all of its problems
        raise
    fingerprint, checked = verified(root, classes, split, resume and resume["data_fingerprint"])
    dataset = Dataset.open(root, classes if resume else observed(classes, checked["mask_values"]))
    if ddp.is_main:
        print(describe_split(split, dataset.images, dataset.masks), flush=True)
        for warning in dataset_warnings(dataset.classes, checked["mask_values"], split, dataset.images) \
                if checked else []:
            warn(warning)

    images, masks = dataset.tensors(split["labeled"], size)
    val_images, val_masks = dataset.tensors(split["val"], size)
    # on the device once, not a batch at a time (on the CPU they are there already)
    images, masks, val_images, val_masks = (t.to(device) for t in (images, masks, val_images, val_masks))
    channels = memory_format(s.channels_last)
    model = UNet(num_classes=dataset.classes.outputs, width=s.width).to(device, memory_format=channels)
    net = ddp.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lr(s.steps))
    state = StageState("teacher", out, model, dict(model=model, optimizer=opt, scheduler=sched), s, split, size,
                       extra=dict(classes=dataset.classes.record(), data_fingerprint=fingerprint))
    start = state.restore(resume) if resume else 0
    geometry, photometric = strengths(Geometry, s, "aug_"), strengths(Photometric, s, "aug_")

    logs, logger = open_run_logs(out, s, split, dict(kind="teacher", network=model.config, processes=ddp.world,
                                                     global_batch=s.batch_size * ddp.world), ddp.is_main)
    logger.info("teacher: %d labelled, %d val images at %s on %s, global batch %d%s", len(images), len(val_images),
                size, device, s.batch_size * ddp.world, f", resumed at step {start}" if start else "")

    def train_step(step):
        x, y = labeled_batch(images, masks, s.batch_size * ddp.world, run_seed, step, device, geometry, photometric)
        x, y = ddp.share(x), ddp.share(y)
        with autocast(s.precision, device):
            logits = net(x.contiguous(memory_format=channels))
        loss = supervised_loss(logits, y, ddp.total)
        value = check_finite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": value}

    run_steps(desc="teacher", steps=s.steps, start_step=start, val_every=s.val_every, train_step=train_step,
              validate=lambda: validation_dice(model, val_images, val_masks, device), save=state.save,
              checkpoint_path=out, logger=logger, writer=ddp.is_main)
    if ddp.is_main:
        state.finish(s.steps)
        print(f"{out}: validation Dice {state.best['score']:.4f} of the kept weights (step {state.best['step']}, "
              f"--keep {s.keep}); logs in {logs}/")


if __name__ == "__main__":
    main()
