"""Stage 1: train the teacher U-Net on the labelled split (cross-entropy + soft Dice).

The checkpoint keeps the weights with the best validation Dice, the resolved split (which every
later stage inherits) and the full training state for --resume.
"""
import torch

from data import load_tensors, prepare_dataset
from engine.checkpoint import check_resume_args, load_checkpoint
from engine.errors import exit_on_user_error
from engine.loop import check_finite, poly_lr, run_steps
from engine.losses import supervised_loss
from engine.run import autocast, base_parser, check_size, memory_format, open_run_logs, positive_int, seed_everything, \
    select_device, writable_file
from engine.split import new_split
from engine.stage import StageState, labeled_batch, validation_dice
from nets.unet import UNet

RESUME_KEYS = ("data", "seed", "size", "steps", "batch_size", "lr", "labeled_ratio", "width", "val_every",
               "precision", "channels_last", "deterministic")


def parse_args(argv=None):
    p = base_parser(__doc__, out="teacher.pt")
    p.add_argument("--labeled-ratio", type=float, default=None,
                   help="fraction of the training ids that keep their labels (default 0.1; not allowed with a "
                        "splits.json, which fixes the labelled set)")
    p.add_argument("--width", type=positive_int, default=16,
                   help="U-Net channels at full resolution (doubles per level)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    device = select_device(args.device)
    size = check_size(args.size)
    out = writable_file(args.out)
    root = prepare_dataset(args.data)
    resume = load_checkpoint(out, ("teacher",), "--out") if args.resume and out.exists() else None
    if resume:
        check_resume_args(resume, args, RESUME_KEYS)
    seed_everything(args.seed, args.deterministic)
    split = resume["split"] if resume else new_split(root, args.seed, args.labeled_ratio)

    images, masks = load_tensors(root, split["labeled"], size)
    val_images, val_masks = load_tensors(root, split["val"], size)
    model = UNet(width=args.width).to(device, memory_format=memory_format(args))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lr(args.steps))
    state = StageState("teacher", out, model, dict(model=model, optimizer=opt, scheduler=sched), args, split, size)
    start = state.restore(resume) if resume else 0

    logs, logger = open_run_logs(out, args, split, dict(kind="teacher", network=model.config))
    logger.info("teacher: %d labelled, %d val images at %s on %s%s", len(images), len(val_images), size, device,
                f", resumed at step {start}" if start else "")
    def train_step(step):
        x, y = labeled_batch(images, masks, args.batch_size, args.seed, step, device)
        with autocast(args, device):
            logits = model(x.contiguous(memory_format=memory_format(args)))
        loss = supervised_loss(logits, y)
        value = check_finite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": value}

    run_steps(desc="teacher", steps=args.steps, start_step=start, val_every=args.val_every, train_step=train_step,
              validate=lambda: validation_dice(model, val_images, val_masks, device),
              save=state.save, checkpoint_path=out, logger=logger)
    print(f"{out}: best validation Dice {state.best['score']:.4f} at step {state.best['step']}; logs in {logs}/")


if __name__ == "__main__":
    main()
