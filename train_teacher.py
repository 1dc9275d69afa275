"""Stage 1: train the teacher U-Net on the labelled split (cross-entropy + soft Dice).

Reads --data (drawing the split, or taking splits.json; the classes from classes.json or
--classes) and checks every image of the split and the masks of its labelled and validation
cases before training (no stage opens an unlabelled or test mask); writes the checkpoint --out
with the final weights (or with --keep best those of the best validation check), the resolved
split and classes (which every later stage inherits) and the full training state for --resume,
and <out stem>_logs/ beside it.

Settings: the block below, on the shared ones of settings.py (Training, LabelledPhotometric).
"""
import dataclasses
import typing
from pathlib import Path

import torch

from data import Dataset, Geometry, Photometric, dataset_classes, from_record, labeled_batch, new_split, observed, \
    prepare_dataset, strengths
from data.check import check_folder, verified
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
    # not the flag's default: a splits.json fixes the labelled set, and a ratio given beside one is an error
    default_labeled_ratio: typing.ClassVar[float] = 0.1
    labeled_ratio: float | None = setting(None, f"fraction of the training ids that keep their labels (default "
                                                f"{default_labeled_ratio}; not allowed with a splits.json, which "
                                                f"fixes the labelled set)",
                                          within="(0, 1]")
    test_fraction: float = setting(0.2, "fraction of the masked ids held out for testing", within="(0, 1)")
    val_fraction: float = setting(0.1, "fraction of the masked ids held out for validation", within="(0, 1)")
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
    root = prepare_dataset(s.data)
    resume = resume_from(out, "teacher", s)
    run_seed = seed_stage(s.seed, "teacher", s.deterministic)
    training_backends(device, s.deterministic)
    classes = from_record(resume["classes"]) if resume else dataset_classes(root, s.classes)
    try:
        split = resume["split"] if resume else new_split(root, s.seed, s.labeled_ratio, s.default_labeled_ratio,
                                                         s.test_fraction, s.val_fraction)
    except UserError:
        check_folder(root, classes)      # a folder the split cannot be drawn from: name all of its problems
        raise
    fingerprint, checked = verified(root, classes, split, resume and resume["data_fingerprint"])
    dataset = Dataset.open(root, classes if resume else observed(classes, checked["mask_values"]))

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
        print(f"{out}: validation Dice {state.best['score']:.4f} of the kept weights (step {state.best['step']}, "
              f"--keep {s.keep}); logs in {logs}/")


if __name__ == "__main__":
    main()
