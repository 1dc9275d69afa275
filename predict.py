"""Segment new radiographs with a trained teacher or student: no ground truth needed.

Reads the network --ckpt (a teacher or student checkpoint, or its ONNX export from export.py,
run with onnxruntime; its classes and input size come with it) and every image in the folder
--images (PNG, JPEG, TIFF or DICOM; gray or RGB; 8 or 16 bit; any size).

Writes the folder --out: masks/<id>.png at each image's original size, holding the mask values
the network was trained with (0 background); areas.csv, each image's area of each class in
pixels and in mm² (with --spacing, else where a DICOM header states the pixel spacing), and the
spacing with its source; overlays/<id>.png, each predicted class's contour in its own colour
(orange for a binary dataset), each region labelled with its class, side and area, unless
--no-overlays; with --probabilities, probabilities/<id>_<mask value>.png, each class's
probability times 255; and summary.json, which names files by their names only (no folder of this
machine). The folder is filled beside --out and moved into place at the end: a bad image or an
interruption leaves nothing half-written, and an existing --out is replaced only with --overwrite.
"""
import collections
import csv
import dataclasses
import functools
import json
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from tqdm import tqdm

from data import Dataset, from_record, list_images
from data.dataset import IMAGE_SUFFIXES
from engine.cli import output_folder, parse, pixel_spacing, select_device, setting
from engine.deploy import load_onnx
from engine.loop import class_map, predict_full_size
from engine.metrics import case_spacing, spacing_columns
from engine.networks import load_network
from engine.overlays import save_overlay
from engine.records import environment, fill_folder, lock_output, portable_command
from errors import UserError, exit_on_user_error, problems_error


@dataclasses.dataclass
class PredictSettings:
    ckpt: Path | None = setting(None, "teacher or student checkpoint (.pt), or its export (.onnx), to segment with",
                                required=True)
    images: Path | None = setting(None, "folder of radiographs to segment (every file in it must be one)",
                                  required=True)
    out: Path | None = setting(None, "folder to write the results to (not inside --images)", required=True)
    overwrite: bool = setting(False, "replace the results of an earlier run at --out")
    device: str = setting("auto", "where to run: auto (CUDA when available), cpu, cuda or cuda:N")
    spacing: tuple[float, ...] | None = setting(None, "pixel size in mm of every image, one value or two (row, "
                                                      "column); default: a DICOM header's pixel spacing, else none "
                                                      "(areas in pixels only)", within="(0, inf)", metavar="MM")
    batch_size: int = setting(8, "images decoded and predicted together", within="[1, inf)")
    overlays: bool = setting(True, "write the contour overlay PNGs")
    probabilities: bool = setting(False, "write each class's probability map as an 8-bit PNG")


OUTPUTS = {"masks", "overlays", "probabilities", "areas.csv", "summary.json"}


def image_folder(folder: Path) -> dict:
    """{id: path} of the radiographs in `folder`; anything else there is an error."""
    if not folder.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    problems = []
    images = list_images(folder, problems)
    if problems:
        raise problems_error(problems, f"--images {folder}")
    if not images:
        raise UserError(f"--images {folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def write_predictions(s, model, ckpt, dataset: Dataset, device, spacing, tmp: Path) -> int:
    """Every output of a prediction into `tmp`; returns the number of images."""
    classes = dataset.classes
    folders = ["masks"] + ["overlays"] * s.overlays + ["probabilities"] * s.probabilities
    for name in folders:
        (tmp / name).mkdir(parents=True)
    values = np.array([0, *classes.values], np.uint8 if max(classes.values) < 256 else np.uint16)
    ids, rows = sorted(dataset.images), []
    cases = predict_full_size(model, dataset, ids, tuple(ckpt["size"]), device, s.batch_size)
    for case_id, image, _, logits in tqdm(cases, desc="predict", total=len(ids), dynamic_ncols=True, mininterval=1.0):
        labels = class_map(logits).to(torch.uint8).cpu().numpy()
        iio.imwrite(tmp / "masks" / f"{case_id}.png", values[labels])
        known = case_spacing(spacing, dataset.spacing(case_id))
        if s.overlays:
            save_overlay(tmp / "overlays" / f"{case_id}.png", image, labels, classes.names, header=case_id,
                         spacing=known)
        if s.probabilities:
            probabilities = (logits.softmax(0) * 255).round().to(torch.uint8).cpu().numpy()
            for c, value in enumerate(classes.values, 1):
                iio.imwrite(tmp / "probabilities" / f"{case_id}_{value}.png", probabilities[c])
        counts = np.bincount(labels.ravel(), minlength=len(values))
        pixels = {f"area_px[{name}]": int(counts[c]) for c, name in enumerate(classes.names, 1)}
        mm2 = {f"area_mm2[{name}]": "" if known is None else round(counts[c] * known[0] * known[1], 6)
               for c, name in enumerate(classes.names, 1)}
        rows.append(dict(id=case_id, height=labels.shape[0], width=labels.shape[1], **spacing_columns(known),
                         **pixels, **mm2))
    with open(tmp / "areas.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(checkpoint=s.ckpt.name, kind=ckpt["kind"], classes=classes.record(), images=s.images.name,
                files=[p.name for _, p in sorted(dataset.images.items())],
                n=len(rows), size=list(ckpt["size"]), spacing_mm=spacing and list(spacing),
                spacing_sources=dict(collections.Counter(r["spacing_source"] for r in rows)),
                checkpoint_code_version=ckpt.get("code_version"),
                environment=dict(environment(), command=portable_command(sys.argv)))
    (tmp / "summary.json").write_text(json.dumps(meta, indent=2) + "\n")
    return len(rows)


@exit_on_user_error
def main(argv=None):
    s = parse(PredictSettings, __doc__, argv)
    spacing = None if s.spacing is None else pixel_spacing(s.spacing)
    device = select_device(s.device)
    if s.out.is_relative_to(s.images):
        raise UserError(f"--out {s.out}: inside --images {s.images}; write the results elsewhere")
    lock_output(s.out)
    out = output_folder(s.out, OUTPUTS, s.overwrite)
    if s.ckpt.suffix.lower() == ".onnx":
        model, ckpt = load_onnx(s.ckpt, "--ckpt")
    else:
        model, ckpt = load_network(s.ckpt, ("teacher", "student"), "--ckpt", device)
    dataset = Dataset(image_folder(s.images), {}, from_record(ckpt.get("classes")))
    n = fill_folder(out, functools.partial(write_predictions, s, model, ckpt, dataset, device, spacing))
    print(f"{n} images segmented by {s.ckpt.name}: masks/, areas.csv{', overlays/' * s.overlays}"
          f"{', probabilities/' * s.probabilities} written to {out}/")


if __name__ == "__main__":
    main()
