"""Evaluate a teacher or student checkpoint on a split, at each image's original resolution.

Reads --data and the network --ckpt (whose split it takes); with --refiner, a teacher's
predictions are first refined by that SinusCycle-GAN checkpoint, which scores pseudo-label
quality (e.g. on --split unlabeled, whose masks training never reads); --postprocess scores the
training-free control instead (each side's largest component, holes filled).

Writes the folder --out (default: <ckpt stem>_eval/ beside the checkpoint): metrics.csv (one row
per case), summary.json (mean, std, median, n and n_undefined of each metric, and the boundary
means with undefined cases scored as the image diagonal), table.md, and overlays/<id>.png
(ground-truth contour green, prediction red; with several classes, each predicted class in its
own colour over the ground truth's contours in white). With several classes every metric is
given per class, as `dice[<class name>]`, and as the mean over the classes under its plain name.
Distances are in mm with --spacing, else in mm for DICOM cases whose header states the pixel
spacing, else in pixels; metrics.csv records each case's spacing and where it came from.

Settings: the block below, on the shared ones of settings.py (Common).
"""
import collections
import csv
import dataclasses
import functools
import json
import math
from pathlib import Path

import torch

from data import prepare_dataset
from data.check import upstream_dataset
from engine.cli import output_folder, parse, pixel_spacing, select_device, setting
from engine.loop import class_map, predict_full_size
from engine.metrics import BOUNDARY, METRICS, SPACING_COLUMNS, case_spacing, class_metrics, per_class, save_overlay, \
    spacing_columns, case_statistics
from engine.records import environment, fill_folder
from engine.state import check_same_experiment
from errors import UserError, exit_on_user_error
from nets import load_network
from nets.cyclegan import refine_logits
from nets.postprocess import postprocess_logits
from settings import Common


@dataclasses.dataclass
class EvaluateSettings(Common):
    out: Path | None = setting(None, "folder to write the results to; default: <ckpt stem>_eval beside --ckpt")
    ckpt: Path | None = setting(None, "teacher or student checkpoint to evaluate", required=True)
    split: str = setting("test", "which part of the checkpoint's split to score",
                         choices=("test", "val", "unlabeled"))
    refiner: Path | None = setting(None, "SinusCycle-GAN checkpoint refining the teacher's predictions before "
                                         "scoring")
    postprocess: bool = setting(False, "post-process a teacher's predictions (each side's largest connected "
                                       "component, holes filled) before scoring")
    spacing: tuple[float, ...] | None = setting(None, "pixel size in mm of every case: one value, or two (row, "
                                                      "column); default: a DICOM header's pixel spacing, else "
                                                      "pixels", within="(0, inf)", metavar="MM")
    batch_size: int = setting(8, "images per forward pass", within="[1, inf)")
    overlays: bool = setting(True, "write the contour overlay PNGs")


OUTPUTS = {"metrics.csv", "summary.json", "table.md", "overlays"}


def evaluate(model, dataset, ids, size, device, spacing, batch_size, overlay_dir=None, refine=None):
    """Per-case metrics of `model` (its logits passed through `refine(images, logits)`, if given) on
    the `ids` of a data.Dataset that have a mask, logits upsampled to each original image size ->
    (rows, ids without a mask). `spacing` (row, column mm) applies to every case; None takes each
    case's from its header, else pixels."""
    names = dataset.classes.names
    rows, unscored = [], []
    for case_id, image, mask, logits in predict_full_size(model, dataset, ids, size, device, batch_size, refine):
        if mask is None:        # real unlabelled images usually have none
            unscored.append(case_id)
            continue
        pred = class_map(logits)[None]
        target = torch.from_numpy(mask)[None].to(device)
        known = case_spacing(spacing, dataset.spacing(case_id))
        scale = (1.0, 1.0) if known is None else known[:2]
        metrics = {k: v[0] for k, v in class_metrics(pred, target, names, scale).items()}
        diagonal = math.hypot(mask.shape[0] * scale[0], mask.shape[1] * scale[1])
        rows.append(dict(id=case_id, height=mask.shape[0], width=mask.shape[1], **spacing_columns(known),
                         diagonal=diagonal, **metrics))
        if overlay_dir is not None:
            save_overlay(overlay_dir / f"{case_id}.png", image, pred[0].cpu().numpy(), mask, len(names))
    return rows, unscored


def summary_of(rows) -> dict:
    diagonals = [r["diagonal"] for r in rows]
    return {m: case_statistics([r[m] for r in rows], diagonals if m.split("[")[0] in BOUNDARY else None)
            for m in rows[0] if m not in ("id", "height", "width", "diagonal", *SPACING_COLUMNS)}


def markdown_table(summary: dict, title: str, names) -> str:
    """Each metric (the mean over the classes, with several), then with several classes each class's."""
    lines = [f"### {title}", "", "| metric | mean ± std | median | n | undefined |", "|---|---|---|---|---|"]
    for m in METRICS:
        s = summary[m]
        lines.append(f"| {m} | {s['mean']:.4f} ± {s['std']:.4f} | {s['median']:.4f} | {s['n']} | {s['n_undefined']} |")
    if len(names) > 1:
        lines += ["", "Per class, mean ± std (undefined cases left out):", "",
                  "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for m in METRICS:
            cells = (summary[per_class(m, n)] for n in names)
            lines.append(f"| {m} | " + " | ".join(f"{s['mean']:.4f} ± {s['std']:.4f}" for s in cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(s, ckpt, model, refine, dataset, ids, size, device, spacing, tmp) -> str:
    """metrics.csv, summary.json, table.md and overlays/ into `tmp`; returns the table."""
    overlays = tmp / "overlays" if s.overlays else None
    (overlays or tmp).mkdir(parents=True)
    rows, unscored = evaluate(model, dataset, ids, size, device, spacing, s.batch_size, overlays, refine)
    if not rows:
        raise UserError(f"--split {s.split}: none of its {len(ids)} cases has a mask in --data {dataset.root}")
    summary = summary_of(rows)
    sources = dict(collections.Counter(r["spacing_source"] for r in rows))
    with open(tmp / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(checkpoint=s.ckpt.name, kind=ckpt["kind"], refiner=s.refiner and s.refiner.name,
                postprocessed=s.postprocess,
                split=s.split, n=len(rows), ids=[r["id"] for r in rows], unscored_without_mask=unscored,
                size=list(size), spacing_mm=spacing and list(spacing), spacing_sources=sources,
                checkpoint_code_version=ckpt.get("code_version"),
                classes=dataset.classes.record(), environment=environment())
    (tmp / "summary.json").write_text(json.dumps(dict(meta=meta, metrics=summary), indent=2) + "\n")
    refined = f" refined by {s.refiner.name}" if s.refiner else " post-processed" if s.postprocess else ""
    unit = "pixels" if set(sources) == {"none (pixels)"} else "mm" if "none (pixels)" not in sources \
        else "mm where a header states the spacing, else pixels"
    title = f"{s.ckpt.name} ({ckpt['kind']}){refined} on {s.split}, n = {len(rows)}, {unit}"
    table = markdown_table(summary, title, dataset.classes.names)
    (tmp / "table.md").write_text(table)
    return table


@exit_on_user_error
def main(argv=None):
    s = parse(EvaluateSettings, __doc__, argv)
    if s.refiner and s.postprocess:
        raise UserError("--refiner and --postprocess: choose one")
    spacing = None if s.spacing is None else pixel_spacing(s.spacing)
    device = select_device(s.device)
    model, ckpt = load_network(s.ckpt, ("teacher", "student"), "--ckpt", device)
    size = tuple(ckpt["size"])
    out = output_folder(s.out or s.ckpt.with_name(s.ckpt.stem + "_eval"), OUTPUTS)
    root = prepare_dataset(s.data)
    dataset, split, _ = upstream_dataset(root, ckpt, "--ckpt", s.ckpt)
    ids = split[s.split]
    if not ids:
        raise UserError(f"--split {s.split}: the split of --ckpt {s.ckpt} has no {s.split} cases")
    refine = None
    if (s.refiner or s.postprocess) and ckpt["kind"] != "teacher":
        flag = "--refiner" if s.refiner else "--postprocess"
        raise UserError(f"{flag} changes a teacher's predictions; --ckpt {s.ckpt} is a {ckpt['kind']}")
    if s.refiner:
        refiner, refiner_ckpt = load_network(s.refiner, ("cyclegan",), "--refiner", device)
        check_same_experiment(refiner_ckpt, "--refiner", s.refiner, ckpt)
        refine = functools.partial(refine_logits, refiner)
    elif s.postprocess:
        refine = postprocess_logits

    # written into a folder beside --out, moved into place when complete
    table = fill_folder(out, functools.partial(write_results, s, ckpt, model, refine, dataset, ids, size, device,
                                               spacing))
    print(table + f"\nwritten to {out}/")


if __name__ == "__main__":
    main()
