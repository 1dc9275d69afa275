"""How well does a KD pixel weight find the teacher's mistakes? A measurement, not a test.

    python -m bench.weight_study --data DIR --teacher teacher.pt \\
        --student start=teacher.pt --student 150=student.pt --out bench/design/weight_study.json

For each student (a student checkpoint, or a teacher checkpoint for a student at its first step,
which starts from the teacher's weights), on the labelled validation split at training size, it
computes the teacher's prediction on the clean images and the student's on the clean images and
on a noised view (as the student sees them in training, with the noise strengths stored in the
first student checkpoint given), and from each pair every weight variant below. A pixel is "wrong" where the
teacher's argmax differs from the validation mask: the validation split is the only labelled
data a design choice may look at (never the unlabelled or the test split's masks). Reported per
variant: the AUROC with which 1 - w ranks wrong above right pixels (0.5 = no information), over
all pixels and within 3 pixels of the teacher's predicted boundary; the mean weight on wrong and
on right pixels; and the share of the loss's weight mass that falls on wrong pixels against the
share of wrong pixels (a weight that suppresses mistakes puts less).

The rule that picks the student's default, fixed before the study was run: the `ssim` variant
with the best mean all-pixel AUROC on the noised view over the students given.
"""
import argparse
import json
import types
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage, stats

from data import Corruption, Photometric, augment_photometric, corrupt, inherited_split, load_tensors, \
    prepare_dataset, step_generator, strengths
from engine.loop import predict_logits
from engine.networks import load_network
from engine.records import write_text
from errors import UserError, exit_on_user_error
from kernels import kd_weight_map

# (mode, window, map temperature) of each weight variant; ssim-w7-t1 is SPEC section 4's structural
# weight. The exponent gamma is left out: a monotone transform of w, it cannot change a ranking.
VARIANTS = {"none": ("none", 7, 1.0), "agree": ("agree", 7, 1.0),
            **{f"ssim-w{w}-t{t:g}": ("ssim", w, t) for w in (3, 7, 15) for t in (1.0, 4.0)}}
BAND = 3      # pixels from the teacher's predicted boundary


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for `positive` labels (Mann-Whitney, ties averaged)."""
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def noised_view(images: torch.Tensor, seed: int, student_args: dict) -> torch.Tensor:
    """The student's view of each image in training (strong photometric changes, blur, cutout), with
    the strengths of the student settings `student_args`."""
    settings = types.SimpleNamespace(**student_args)
    g = step_generator(seed, 0, "weight-study")
    return corrupt(augment_photometric(images, g, strengths(Photometric, settings, "strong_")), g,
                   strengths(Corruption, settings, "strong_"))


def describe(weight: torch.Tensor, wrong: torch.Tensor, band: torch.Tensor) -> dict:
    w, wrong, band = weight.numpy().ravel(), wrong.numpy().ravel(), band.numpy().ravel()
    return dict(auroc=auroc(1 - w, wrong), auroc_band=auroc(1 - w[band], wrong[band]),
                mean_w_wrong=float(w[wrong].mean()), mean_w_right=float(w[~wrong].mean()),
                weight_share_wrong=float(w[wrong].sum() / w.sum()))


def study(teacher, student, images, masks, seed: int, student_args: dict) -> dict:
    device = torch.device("cpu")
    zt = predict_logits(teacher, images, device)
    pred = zt.argmax(1)
    wrong = pred != masks
    edges = torch.from_numpy(np.stack([_near_boundary(p) for p in pred.numpy()]))
    out = dict(wrong_share=float(wrong.float().mean()), wrong_share_band=float(wrong[edges].float().mean()))
    for view, x in (("clean", images), ("noised", noised_view(images, seed, student_args))):
        zs = predict_logits(student, x, device)
        for name, (mode, window, map_temperature) in VARIANTS.items():
            w = kd_weight_map(zs, zt, mode=mode, window=window, map_temperature=map_temperature, backend="torch")
            out[f"{view}/{name}"] = describe(w, wrong, edges)
    return out


def _near_boundary(pred: np.ndarray) -> np.ndarray:
    """Pixels within BAND of the boundary of a predicted mask (empty mask: none)."""
    foreground = pred.astype(bool)
    if not foreground.any() or foreground.all():
        return np.zeros_like(foreground)
    # each pixel's distance to the nearest pixel of the other side of the boundary
    inside, outside = ndimage.distance_transform_edt(foreground), ndimage.distance_transform_edt(~foreground)
    return np.where(foreground, inside, outside) <= BAND


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--student", action="append", required=True,
                   help="LABEL=checkpoint of a student, or of a teacher for a student at its first step; repeat")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = prepare_dataset(args.data)
    teacher, ckpt = load_network(args.teacher, ("teacher",), "--teacher", torch.device("cpu"))
    split = inherited_split(ckpt, "--teacher", args.teacher, root)
    images, masks = load_tensors(root, split["val"], ckpt["size"])
    result = dict(teacher=args.teacher.name, split="val", cases=len(images), variants=VARIANTS, band_pixels=BAND,
                  students={})
    students = {}
    for entry in args.student:
        label, _, path = entry.partition("=")
        students[label] = load_network(Path(path), ("student", "teacher"), "--student", torch.device("cpu"))
    student_args = next((ckpt["args"] for _, ckpt in students.values() if ckpt["kind"] == "student"), None)
    if student_args is None:
        raise UserError("--student: give at least one student checkpoint; the noised view takes its strengths from it")
    for label, (student, _) in students.items():
        result["students"][label] = study(teacher, student, images, masks, ckpt["split"]["seed"], student_args)
        print(label, {k: round(v["auroc"], 3) for k, v in result["students"][label].items()
                      if isinstance(v, dict) and k.startswith("noised/")}, flush=True)
    ssim_variants = [k for k in VARIANTS if k.startswith("ssim")]
    mean = {k: float(np.mean([st[f"noised/{k}"]["auroc"] for st in result["students"].values()]))
            for k in ssim_variants}
    result["mean_noised_auroc"], result["chosen"] = mean, max(mean, key=mean.get)
    print("chosen by the rule:", result["chosen"], {k: round(v, 3) for k, v in mean.items()})
    write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
