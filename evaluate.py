"""Evaluate a teacher or student checkpoint on a split, at each image's original resolution.

Reads --data and the network --ckpt (whose split it takes); with --refiner, a teacher's
predictions are first refined by that SinusCycle-GAN checkpoint, which scores pseudo-label
quality (e.g. on --split unlabeled, whose masks training never reads); --postprocess scores the
training-free control instead (each side's largest component, holes filled).

Writes the folder --out (default: <ckpt stem>_<split>_eval/ beside the checkpoint, with _refined
or _postprocessed before _eval; an existing one is replaced only with --overwrite): metrics.csv
(one row per case), summary.json (mean, std, median, n and n_undefined of each metric, and the
boundary means with undefined cases scored as the image diagonal), table.md, and
overlays/<id>.png (ground-truth contour sky blue, prediction orange; with several classes, each
predicted class in its own colour over the ground truth's contours in white; the case's Dice in
its header). With several classes every metric is given per class, as `dice[<class name>]`, and
as the mean over the classes under its plain name; a class that no mask of the scored cases
holds is named and left out of that mean. Distances are in mm with --spacing, else in mm for
DICOM cases whose header states the pixel spacing, else in pixels; metrics.csv records each
case's spacing, where it came from and its `distance_unit`, and where the cases have both units
each boundary metric is summarised per unit (`hd95 (mm)`, `hd95 (px)`), never averaged across.

Settings: the block below, on the shared ones of settings.py (Common).
"""
import collections
import csv
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data import prepare_dataset
from data.check import upstream_dataset
from engine.cli import output_folder, parse, pixel_spacing, select_device, setting
from engine.loop import class_map, predict_full_size
from engine.metrics import BOUNDARY, METRICS, SPACING_COLUMNS, case_spacing, case_statistics, class_means, \
    class_metrics, per_class, spacing_columns
from engine.networks import load_network
from engine.overlays import save_overlay
from engine.records import environment, fill_folder, lock_output, portable_command
from engine.state import check_same_experiment
from errors import UserError, exit_on_user_error
from nets.cyclegan import refine_logits
from nets.postprocess import postprocess_logits
from settings import Common


@dataclasses.dataclass
class EvaluateSettings(Common):
    data: Path | None = setting(None, "dataset root with images/ and masks/; default: the folder --ckpt was "
                                      "trained on")
    out: Path | None = setting(None, "folder to write the results to; default: <ckpt stem>_<split>_eval beside "
                                     "--ckpt")
    overwrite: bool = setting(False, "replace the results of an earlier run at --out")
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
UNIT_NAMES = {"mm": "mm", "px": "pixels"}


def evaluate(model, dataset, ids, size, device, spacing, batch_size, overlay_dir=None, refine=None):
    """Per-case metrics of `model` (its logits passed through `refine(images, logits)`, if given) on
    the `ids` of a data.Dataset that have a mask, logits upsampled to each original image size ->
    (rows, ids without a mask, names of the classes no scored mask holds). `spacing` (row, column
    mm) applies to every case; None takes each case's from its header, else pixels. With several
    classes a row's plain metrics are the means over the classes some scored mask holds."""
    names = dataset.classes.names
    cases, unscored, held = [], [], set()
    scored = predict_full_size(model, dataset, ids, size, device, batch_size, refine)
    for case_id, image, mask, logits in tqdm(scored, desc="evaluate", total=len(ids), dynamic_ncols=True,
                                             mininterval=1.0):
        if mask is None:        # real unlabelled images usually have none
            unscored.append(case_id)
            continue
        pred = class_map(logits)[None]
        target = torch.from_numpy(mask)[None].to(device)
        held.update(int(v) for v in torch.unique(target).tolist())
        known = case_spacing(spacing, dataset.spacing(case_id))
        scale = (1.0, 1.0) if known is None else known[:2]
        metrics = class_metrics(pred, target, names, scale)
        diagonal = math.hypot(mask.shape[0] * scale[0], mask.shape[1] * scale[1])
        cases.append((dict(id=case_id, height=mask.shape[0], width=mask.shape[1], **spacing_columns(known),
                           distance_unit="px" if known is None else "mm", diagonal=diagonal), metrics))
        if overlay_dir is not None:
            save_overlay(overlay_dir / f"{case_id}.png", image, pred[0].cpu().numpy(), names, mask,
                         f"{case_id}  {overlay_scores(metrics, names)}", known)
    absent = [n for c, n in enumerate(names, 1) if c not in held] if len(names) > 1 else []
    averaged = [n for n in names if n not in absent] or names
    rows = []
    for row, metrics in cases:
        means = class_means(metrics, averaged) if len(names) > 1 else {}
        rows.append(dict(row, **{k: v[0] for k, v in (means | metrics).items()}))
    return rows, unscored, absent


def overlay_scores(metrics: dict, names) -> str:
    """A case's Dice, each class's with several, for its overlay."""
    keys = {"Dice": "dice"} if len(names) == 1 else {f"Dice {n}": per_class("dice", n) for n in names}
    return "  ".join(f"{label} {metrics[key][0]:.3f}" for label, key in keys.items())


def unit_key(metric: str, unit: str | None) -> str:
    """A summary's key of a boundary metric over the cases of one distance unit ("hd95 (mm)")."""
    return metric if unit is None else f"{metric} ({unit})"


def units_apart(rows) -> list:
    """The distance units the boundary metrics are summarised in apart: [None] (all cases share one)
    or each unit of the cases."""
    units = sorted({r["distance_unit"] for r in rows})
    return units if len(units) > 1 else [None]


def summary_of(rows) -> dict:
    out = {}
    for m in rows[0]:
        if m in ("id", "height", "width", "diagonal", "distance_unit", *SPACING_COLUMNS):
            continue
        boundary = m.split("[")[0] in BOUNDARY
        for unit in units_apart(rows) if boundary else [None]:
            part = [r for r in rows if unit in (None, r["distance_unit"])]
            out[unit_key(m, unit)] = case_statistics([r[m] for r in part],
                                                     [r["diagonal"] for r in part] if boundary else None)
    return out


def markdown_table(summary: dict, title: str, names, units, absent) -> str:
    """Each metric (the mean over the classes, with several), a boundary metric once per distance unit
    where the cases have several; then with several classes each class's."""
    keys = [(m, unit) for m in METRICS for unit in (units if m in BOUNDARY else [None])]
    lines = [f"### {title}", "", "| metric | mean ± std | median | n | undefined |", "|---|---|---|---|---|"]
    for m, unit in keys:
        s = summary[unit_key(m, unit)]
        lines.append(f"| {unit_key(m, unit)} | {s['mean']:.4f} ± {s['std']:.4f} | {s['median']:.4f} | {s['n']} | "
                     f"{s['n_undefined']} |")
    if len(names) > 1:
        lines += ["", "Per class, mean ± std (undefined cases left out):", "",
                  "| metric | " + " | ".join(n + " (in no mask)" * (n in absent) for n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for m, unit in keys:
            cells = (summary[unit_key(per_class(m, n), unit)] for n in names)
            lines.append(f"| {unit_key(m, unit)} | " + " | ".join(f"{s['mean']:.4f} ± {s['std']:.4f}" for s in cells)
                         + " |")
    if absent:
        lines += ["", f"No scored mask holds {', '.join(absent)}: left out of the means over the classes."]
    return "\n".join(lines) + "\n"


def write_results(s, ckpt, model, refine, dataset, ids, size, device, spacing, tmp) -> str:
    """metrics.csv, summary.json, table.md and overlays/ into `tmp`; returns the table."""
    if not any(case_id in dataset.masks for case_id in ids):      # said before any case is predicted
        raise UserError(f"--split {s.split}: none of its {len(ids)} cases has a mask in --data {dataset.root}")
    overlays = tmp / "overlays" if s.overlays else None
    (overlays or tmp).mkdir(parents=True)
    rows, unscored, absent = evaluate(model, dataset, ids, size, device, spacing, s.batch_size, overlays, refine)
    summary, units = summary_of(rows), units_apart(rows)
    sources = dict(collections.Counter(r["spacing_source"] for r in rows))
    with open(tmp / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(checkpoint=s.ckpt.name, kind=ckpt["kind"], refiner=s.refiner and s.refiner.name,
                postprocessed=s.postprocess,
                split=s.split, n=len(rows), ids=[r["id"] for r in rows], unscored_without_mask=unscored,
                size=list(size), spacing_mm=spacing and list(spacing), spacing_sources=sources,
                classes_in_no_mask=absent, checkpoint_code_version=ckpt.get("code_version"),
                classes=dataset.classes.record(), environment=dict(environment(), command=portable_command(sys.argv)))
    (tmp / "summary.json").write_text(json.dumps(dict(meta=meta, metrics=summary), indent=2) + "\n")
    refined = f" refined by {s.refiner.name}" if s.refiner else " post-processed" if s.postprocess else ""
    unit = UNIT_NAMES[rows[0]["distance_unit"]] if units == [None] else \
        "distances in mm where a header states the spacing, in pixels elsewhere, summarised apart"
    title = f"{s.ckpt.name} ({ckpt['kind']}){refined} on {s.split}, n = {len(rows)}, {unit}"
    table = markdown_table(summary, title, dataset.classes.names, units, absent)
    (tmp / "table.md").write_text(table)
    return table


def data_folder(given: Path | None, ckpt: dict, path) -> Path:
    """--data, or when it is not given the folder the checkpoint was trained on, if it is here."""
    if given is not None:
        return given
    trained_on = Path(ckpt["args"].get("data", ""))
    if not trained_on.is_dir():
        raise UserError(f"--data: not given, and the folder --ckpt {path} was trained on ({trained_on.name}) is not "
                        f"found where it was; give --data with that dataset")
    return trained_on


def default_out(s) -> Path:
    suffix = "_refined" if s.refiner else "_postprocessed" if s.postprocess else ""
    return s.ckpt.with_name(f"{s.ckpt.stem}_{s.split}{suffix}_eval")


@exit_on_user_error
def main(argv=None):
    s = parse(EvaluateSettings, __doc__, argv)
    if s.refiner and s.postprocess:
        raise UserError("--refiner and --postprocess: choose one")
    spacing = None if s.spacing is None else pixel_spacing(s.spacing)
    device = select_device(s.device)
    model, ckpt = load_network(s.ckpt, ("teacher", "student"), "--ckpt", device)
    size = tuple(ckpt["size"])
    lock_output(s.out or default_out(s))
    out = output_folder(s.out or default_out(s), OUTPUTS, s.overwrite)
    root = prepare_dataset(data_folder(s.data, ckpt, s.ckpt))
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
