"""The step loop every training stage shares: progress bar with the running loss, periodic
validation and checkpointing, every step's numbers in train.jsonl and their curves in curves.png,
a clean stop on a non-finite loss; learning-rate schedules and batched inference."""
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from errors import UserError
from .curves import Curves
from .metrics import dice_score
from .records import StepLog, logs_folder


class NonFiniteLoss(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def check_finite(loss: torch.Tensor, name: str = "loss") -> float:
    """Return the loss as a float; raise before the optimiser can step on a NaN or Inf."""
    return finite_values({name: loss})[name]


def finite_values(losses: dict) -> dict:
    """{name: float} of the 0-dim `losses`, read from the device in one transfer (each read waits for
    the device, which then idles until the host queues more); raise before the optimiser can step on
    a NaN or Inf, naming the first that is one."""
    values = torch.stack([loss.detach().float() for loss in losses.values()]).tolist()
    for name, value in zip(losses, values):
        if not math.isfinite(value):
            raise NonFiniteLoss(name)
    return dict(zip(losses, values))


def poly_lr(steps: int, power: float = 0.9):
    """LambdaLR factor: polynomial decay from 1 at step 0 to 0 at `steps`."""
    return lambda step: max(0.0, 1.0 - step / steps) ** power


def constant_then_linear(steps: int, decay_start: float):
    """LambdaLR factor: 1 until `decay_start * steps`, then linear to 0 at `steps`."""
    start = int(decay_start * steps)
    return lambda step: 1.0 if step < start else max(0.0, (steps - step) / max(steps - start, 1))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 8,
                   refine=None) -> torch.Tensor:
    """Logits for (N, 1, H, W) images in eval mode, passed through `refine(images, logits)` if given
    (a SinusCycle-GAN refiner or the post-processing), returned on `device` in float32."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        logits = model(x).float()
        out.append(logits if refine is None else refine(x, logits))
    model.train(was_training)
    return torch.cat(out)


def predict_full_size(model: torch.nn.Module, dataset, ids, size, device: torch.device, batch_size: int = 8,
                      refine=None):
    """(id, image, class indices or None, logits (C, H0, W0) on `device`) of each case of `ids` of a
    data.Dataset, in order: cases decoded once, a batch at a time, predicted at the network input
    `size` and the logits upsampled bilinearly to each case's original size."""
    for chunk, cases, images in dataset.batches(ids, size, batch_size):
        logits = predict_logits(model, images, device, batch_size, refine)
        for case_id, (image, labels), z in zip(chunk, cases, logits):
            up = F.interpolate(z[None], size=image.shape, mode="bilinear", align_corners=False)
            yield case_id, image, labels, up[0]


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """The class of each pixel of (C, H, W) logits: their argmax over C, taken on a channels-last copy
    because torch's CPU argmax over the leading dimension is ~8x slower on a full-size panorama."""
    return logits.permute(1, 2, 0).contiguous().argmax(-1)


def validation_dice(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, device) -> dict:
    return {"dice": dice_score(predict_logits(model, images, device), masks.to(device)).item()}


def run_steps(*, desc: str, steps: int, start_step: int, val_every: int, train_step, validate, save,
              checkpoint_path, logger: logging.Logger, saved_at_start: bool = False, writer: bool = True) -> None:
    """Call `train_step(step) -> {name: float}` for each step from `start_step`, then every
    `val_every` steps and at the end `save(step_done, validate())`. `saved_at_start`: a
    checkpoint of step `start_step` exists (always so when resuming). Only the `writer` (the one
    process, or rank 0 of several) validates, saves, shows progress and writes train.jsonl (each
    step's numbers, then a "time" line with its wall time `step_s`, validation and saving apart) and
    curves.png into the checkpoint's logs folder (redrawn at validations within a share of the run's
    time, see curves.Curves, and always at the end and at a stop on a non-finite loss)."""
    if start_step >= steps:
        if writer:
            print(f"{checkpoint_path}: already trained for {start_step} steps; nothing to do")
        return
    logs = logs_folder(checkpoint_path)
    record = StepLog(logs, start_step) if writer else None
    curves = Curves(logs / "curves.png", f"{desc}: {Path(checkpoint_path).name}")

    def draw(force=True):
        if record is not None:
            curves.draw(record.entries, force)

    running: dict = {}
    last_saved = start_step if start_step or saved_at_start else None
    bar = tqdm(range(start_step, steps), desc=desc, initial=start_step, total=steps, dynamic_ncols=True,
               mininterval=1.0, disable=not writer)
    try:
        for step in bar:
            started = time.perf_counter()
            try:
                losses = train_step(step)
            except NonFiniteLoss as err:
                bar.close()
                logger.info("non-finite %s at step %d", err.name, step)
                draw()
                kept = (f"the last good checkpoint {checkpoint_path} (step {last_saved}) is kept"
                        if last_saved is not None else "no checkpoint had been written yet")
                raise UserError(f"non-finite {err.name} at step {step}: training stopped; {kept}. "
                                f"Try a lower --lr.") from None
            # a step's loss check waits for the device's work queued before it, so in a steady state
            # this is the time a step takes, the device's share included
            seconds = time.perf_counter() - started
            running = {k: v if k not in running else 0.9 * running[k] + 0.1 * v for k, v in losses.items()}
            bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()}, refresh=False)
            done = step + 1
            if record is not None:
                record.add(done, "train", losses)
                record.add(done, "time", {"step_s": seconds})
            if writer and (done % val_every == 0 or done == steps):
                metrics = validate()
                save(done, metrics)
                last_saved = done
                record.add(done, "val", metrics)
                draw(force=done == steps)
                logger.info("step %d %s %s", done, " ".join(f"{k}={v:.4f}" for k, v in running.items()),
                            " ".join(f"val_{k}={v:.4f}" for k, v in metrics.items()))
    finally:
        bar.close()
        if record is not None:
            record.close()
