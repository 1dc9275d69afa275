"""One split per experiment: drawn (or read from splits.json) by the teacher stage, carried by
every checkpoint after it, so that all stages of one experiment see the same cases.

Without a splits.json the masked ids are shuffled by the seed: a test fraction, a validation
fraction, the rest train, of which a labelled ratio keeps its labels (by default all of them:
every mask a user gives is used) and the others join the images that have no mask as the
unlabelled set.
"""
import json
import math
from pathlib import Path

import numpy as np

from errors import UserError

from .dataset import Dataset, few

SPLIT_KEYS = ("labeled", "unlabeled", "val", "test")
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1     # of the masked ids, held out
# The generated phantom has a mask for every case, standing in for a dataset of which few are
# masked: there, by default, a tenth of the training cases keep their labels and the others are
# the unlabelled images. A user's masks are all used.
PHANTOM_LABELED_RATIO = 0.1
SHOWN_IDS = 20          # ids listed per part when the split is printed


def _round(x):
    return int(math.floor(x + 0.5))   # half up, unlike Python's round-half-even


def resolve_split(root, seed: int, labeled_ratio: float, test_fraction: float, val_fraction: float) -> dict:
    """{labeled, unlabeled, val, test}: sorted id lists, from splits.json or drawn by `seed`."""
    listed = Dataset.open(root)
    images, masks = listed.images, listed.masks
    if (Path(root) / "splits.json").exists():
        return read_splits(Path(root) / "splits.json", images, masks)
    masked = sorted(masks)                     # sorted: independent of the file-system order
    order = [masked[i] for i in np.random.default_rng(seed).permutation(len(masked))]
    n_test, n_val = _round(test_fraction * len(masked)), _round(val_fraction * len(masked))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    if min(n_test, n_val, len(train)) < 1:
        raise UserError(f"--data {root}: {len(masked)} masked images split into {len(train)} train, {len(val)} val and "
                        f"{len(test)} test at --val-fraction {val_fraction} --test-fraction {test_fraction}; each part "
                        f"needs at least one: add masks, change the fractions or write a splits.json")
    n_labeled = len(train) if labeled_ratio == 1 else max(1, _round(labeled_ratio * len(train)))
    unmasked = [i for i in images if i not in masks]
    return dict(labeled=sorted(train[:n_labeled]), unlabeled=sorted(train[n_labeled:] + unmasked),
                val=sorted(val), test=sorted(test))


def parse_splits(path) -> dict:
    """The lists of a splits.json, sorted, checked for form only."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err}); fix or remove it")
    if not isinstance(raw, dict) or set(raw) - set(SPLIT_KEYS) or \
            not all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in raw.values()):
        raise UserError(f"{path}: must be an object with lists of id strings under "
                        f"{', '.join(SPLIT_KEYS)}")
    return {k: sorted(raw.get(k, [])) for k in SPLIT_KEYS}


def read_splits(path, images, masks):
    """The split of a splits.json, checked against the dataset's images and masks."""
    split = parse_splits(path)
    named = [i for ids in split.values() for i in ids]
    unknown = sorted(set(named) - set(images))
    if unknown:
        raise UserError(f"{path}: unknown ids (no image in images/): {few(unknown)}")
    for a, b in [("val", "labeled"), ("val", "unlabeled"), ("test", "labeled"), ("test", "unlabeled"),
                 ("val", "test"), ("labeled", "unlabeled")]:
        both = set(split[a]) & set(split[b])
        if both:
            raise UserError(f"{path}: ids in both {a} and {b}: {few(both)}; each id belongs to one list")
    repeated = sorted({i for i in named if named.count(i) > 1})
    if repeated:
        raise UserError(f"{path}: ids listed twice: {few(repeated)}")
    for key in ("labeled", "val", "test"):
        unmasked = [i for i in split[key] if i not in masks]
        if unmasked:
            raise UserError(f"{path}: {key} ids without a mask in masks/: {few(unmasked)}")
        if not split[key]:
            raise UserError(f"{path}: the {key} list is empty; it needs at least one id")
    return split


def default_labeled_ratio(root: Path) -> float:
    """The labelled ratio of a split drawn without --labeled-ratio: 1 (every masked training case is
    labelled), or PHANTOM_LABELED_RATIO on the generated phantom."""
    return PHANTOM_LABELED_RATIO if (Path(root) / "phantom.json").is_file() else 1.0


def new_split(root: Path, seed: int, labeled_ratio: float | None, test_fraction: float, val_fraction: float) -> dict:
    """The teacher's split: from root/splits.json (which fixes the labelled set, so a
    --labeled-ratio is an error there), else drawn by `seed` with `labeled_ratio`, or the
    dataset's default_labeled_ratio where none was given."""
    fixed = (root / "splits.json").exists()
    if fixed and labeled_ratio is not None:
        raise UserError(f"--labeled-ratio {labeled_ratio}: {root / 'splits.json'} fixes the labelled set; "
                        f"drop the flag or remove splits.json")
    ratio = None if fixed else default_labeled_ratio(root) if labeled_ratio is None else labeled_ratio
    split = resolve_split(root, seed, ratio or 1.0, test_fraction, val_fraction)
    return dict(split, seed=seed, labeled_ratio=ratio)


def listed(ids) -> str:
    ids = sorted(ids)
    return few(ids, SHOWN_IDS) if ids else "none"


def describe_split(split: dict, images, masks) -> str:
    """The split in a few lines, as the teacher and the data check print it: each part's size with its
    ids (where every mask went), the unlabelled images counted by whether they have a mask (one
    training never reads), and the images a splits.json leaves out of every list."""
    how = "from splits.json" if split.get("labeled_ratio") is None else \
        f"drawn by --seed {split['seed']}, --labeled-ratio {split['labeled_ratio']:g}"
    lines = [f"split ({how}): {len(images)} images, {len(masks)} with a mask"]
    for key, name in (("labeled", "labelled"), ("val", "validation"), ("test", "test")):
        lines.append(f"  {name:<11}{len(split[key]):>5}: {listed(split[key])}")
    masked = [i for i in split["unlabeled"] if i in masks]
    lines.append(f"  {'unlabelled':<11}{len(split['unlabeled']):>5}: {len(split['unlabeled']) - len(masked)} without "
                 f"a mask" + (f", {len(masked)} whose mask training does not read: {listed(masked)}" if masked else ""))
    left_out = set(images) - {i for key in SPLIT_KEYS for i in split[key]}
    if left_out:
        lines.append(f"  {'left out':<11}{len(left_out):>5}: in no list of splits.json, so used nowhere: "
                     f"{listed(left_out)}")
    return "\n".join(lines)


def inherited_split(ckpt: dict, flag: str, path, root: Path) -> dict:
    """The split stored in an upstream checkpoint; a splits.json in --data that disagrees with it
    is an error. (Its ids were checked against the files when the experiment began, and the data
    check does it again whenever the folder has changed since.)"""
    split = ckpt["split"]
    if (root / "splits.json").exists():
        fixed = parse_splits(root / "splits.json")
        if any(sorted(fixed[k]) != sorted(split[k]) for k in SPLIT_KEYS):
            raise UserError(f"{root / 'splits.json'} differs from the split {flag} {path} was trained on; "
                            f"use the --data that network was trained on")
    return split
