"""Evaluate a teacher or student checkpoint on a split, at each image's original resolution.

With --refiner, a teacher's predictions are first refined by that SinusCycle-GAN checkpoint: this
scores pseudo-label quality (e.g. on --split unlabeled, whose masks training never reads).

Writes, into --out: metrics.csv (one row per case), summary.json (mean, std, median, n and
n_undefined of each metric, and the boundary means with undefined cases scored as the image
diagonal), table.md, and overlays/<id>.png (ground-truth contour green, prediction red).
"""
import csv
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from data import load_case, load_tensors, prepare_dataset
from engine.checkpoint import load_checkpoint, rebuild
from engine.errors import UserError, exit_on_user_error
from engine.metrics import BOUNDARY, METRICS, case_metrics, summarize
from engine.overlay import save_overlay
from engine.predict import predict_logits
from engine.refine import load_refiner, refine_all
from engine.run import base_parser, environment, positive_int, select_device, writable_dir
from engine.split import inherited_split
from nets.unet import UNet


def parse_args(argv=None):
    p = base_parser(__doc__, out="<checkpoint>_eval", training=False)
    p.add_argument("--ckpt", type=Path, required=True, help="teacher or student checkpoint to evaluate")
    p.add_argument("--split", choices=("test", "val", "unlabeled"), default="test",
                   help="which part of the checkpoint's split to score")
    p.add_argument("--refiner", type=Path, default=None,
                   help="SinusCycle-GAN checkpoint refining the teacher's predictions before scoring")
    p.add_argument("--spacing", type=float, nargs="+", default=[1.0], metavar="MM",
                   help="pixel size in mm: one value, or two (row, column); the default 1 gives pixels")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    return p.parse_args(argv)


OUTPUTS = {"metrics.csv", "summary.json", "table.md", "overlays"}


def spacing_from(values) -> tuple:
    if len(values) not in (1, 2) or any(not v > 0 or not math.isfinite(v) for v in values):
        raise UserError(f"--spacing {' '.join(map(str, values))}: give one or two positive numbers (mm per pixel)")
    return (values[0], values[-1])


def evaluate(model, root, ids, size, device, spacing, batch_size, overlay_dir=None, refiner=None):
    """Per-case metrics of `model` (refined by `refiner`, if given) on the `ids` that have a mask,
    logits upsampled to each original image size -> (rows, ids without a mask)."""
    images, _ = load_tensors(root, ids, size, with_masks=False)
    logits = predict_logits(model, images, device, batch_size)
    if refiner is not None:
        logits = refine_all(refiner, images, logits, device, batch_size)
    rows, unscored = [], []
    for case_id, case_logits in zip(ids, logits):
        image, mask = load_case(root, case_id)
        if mask is None:        # real unlabelled images usually have none
            unscored.append(case_id)
            continue
        up = F.interpolate(case_logits[None].to(device), size=mask.shape, mode="bilinear", align_corners=False)
        pred = up.argmax(1) == 1
        target = torch.from_numpy(mask)[None].to(device)
        metrics = {k: v[0] for k, v in case_metrics(pred, target, spacing).items()}
        diagonal = math.hypot(mask.shape[0] * spacing[0], mask.shape[1] * spacing[1])
        rows.append(dict(id=case_id, height=mask.shape[0], width=mask.shape[1], diagonal=diagonal, **metrics))
        if overlay_dir is not None:
            save_overlay(overlay_dir / f"{case_id}.png", image, mask, pred[0].cpu().numpy())
    return rows, unscored


def summary_of(rows) -> dict:
    diagonals = [r["diagonal"] for r in rows]
    return {m: summarize([r[m] for r in rows], diagonals if m in BOUNDARY else None) for m in METRICS}


def markdown_table(summary: dict, title: str) -> str:
    lines = [f"### {title}", "", "| metric | mean ± std | median | n | undefined |", "|---|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['mean']:.4f} ± {s['std']:.4f} | {s['median']:.4f} | {s['n']} | {s['n_undefined']} |")
    return "\n".join(lines) + "\n"


def write_results(args, ckpt, model, refiner, root, ids, size, device, spacing, tmp) -> str:
    """metrics.csv, summary.json, table.md and overlays/ into `tmp`; returns the table."""
    overlays = None if args.no_overlays else tmp / "overlays"
    (overlays or tmp).mkdir(parents=True)
    rows, unscored = evaluate(model, root, ids, size, device, spacing, args.batch_size, overlays, refiner)
    if not rows:
        raise UserError(f"--split {args.split}: none of its {len(ids)} cases has a mask in --data {root}")
    summary = summary_of(rows)
    with open(tmp / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(checkpoint=str(args.ckpt), kind=ckpt["kind"], refiner=args.refiner and str(args.refiner),
                split=args.split, n=len(rows), ids=[r["id"] for r in rows], unscored_without_mask=unscored,
                size=list(size), spacing_mm=list(spacing), checkpoint_code_version=ckpt.get("code_version"),
                environment=environment())
    (tmp / "summary.json").write_text(json.dumps(dict(meta=meta, metrics=summary), indent=2) + "\n")
    refined = f" refined by {args.refiner.name}" if args.refiner else ""
    title = f"{args.ckpt.name} ({ckpt['kind']}){refined} on {args.split}, n = {len(rows)}, " \
            f"{'mm' if spacing != (1.0, 1.0) else 'pixels'}"
    table = markdown_table(summary, title)
    (tmp / "table.md").write_text(table)
    return table


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    device = select_device(args.device)
    spacing = spacing_from(args.spacing)
    ckpt = load_checkpoint(args.ckpt, ("teacher", "student"), "--ckpt")
    size = tuple(ckpt["size"])
    if args.size is not None and tuple(args.size) != size:
        raise UserError(f"--size {args.size[0]} {args.size[1]}: --ckpt {args.ckpt} was trained at {size[0]} "
                        f"{size[1]}; drop --size")
    out = (args.out if str(args.out) != "<checkpoint>_eval" else args.ckpt.with_name(args.ckpt.stem + "_eval"))
    out = out.resolve()
    if out.exists() and not (out.is_dir() and {p.name for p in out.iterdir()} <= OUTPUTS):
        raise UserError(f"--out {out}: exists and holds more than an evaluation's files; choose a new folder")
    writable_dir(out.parent)
    root = prepare_dataset(args.data)
    model = rebuild(UNet, ckpt, "--ckpt", args.ckpt).to(device)
    split = inherited_split(ckpt, "--ckpt", args.ckpt, None, root)
    ids = split[args.split]
    if not ids:
        raise UserError(f"--split {args.split}: the split of --ckpt {args.ckpt} has no {args.split} cases")
    refiner = None
    if args.refiner:
        if ckpt["kind"] != "teacher":
            raise UserError(f"--refiner refines a teacher's predictions; --ckpt {args.ckpt} is a {ckpt['kind']}")
        refiner, _ = load_refiner(args.refiner, device, ckpt)

    # Everything is written to a sibling folder first and moved in place at the end.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        table = write_results(args, ckpt, model, refiner, root, ids, size, device, spacing, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(table + f"\nwritten to {out}/")


if __name__ == "__main__":
    main()
