"""The dataset check: every file an experiment will use, decoded once, before anything trains.

    python -m data.check --data DIR [--classes 1=left 2=right]

The teacher, the first stage of an experiment, decodes every image and mask of its split and
checks them (decodable, a 2-D gray or RGB image or a grey DICOM radiograph, finite pixel
values, masks of their image's size holding only the dataset's classes) and refuses the dataset
with one message naming every bad file; a constant image is a warning. It stores a fingerprint
of the folder (the names, sizes and modification times of its files) in its checkpoint, and each
later stage stores the one it trusted: a later stage whose --data still has that fingerprint
skips the check, and one whose data changed checks it again.
"""
import collections
import hashlib
import os
import time
from pathlib import Path

from errors import OneLineParser, UserError, exit_on_user_error, problems_error

from .classes import dataset_classes, inherited_classes, observed, present_values
from .dataset import Dataset, constant_warning, few, in_parallel, read_image, read_mask, scan, warn
from .split import SPLIT_KEYS, inherited_split, read_splits

FINGERPRINTED = ("images", "masks", "splits.json", "classes.json")


def fingerprint(root) -> str:
    """A hash of the names, sizes and modification times of the files that make up a dataset."""
    lines = []
    for name in FINGERPRINTED:
        path = Path(root) / name
        entries = sorted(os.scandir(path), key=lambda e: e.name) if path.is_dir() else [path] if path.exists() else []
        for entry in entries:
            if not entry.name.startswith("."):
                stat = entry.stat()
                lines.append(f"{name}/{entry.name}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def check_case(dataset: Dataset, case_id: str, with_mask: bool = True) -> dict:
    """Decode one case's image and (`with_mask`) mask: its problems, warnings, size, bit depth, the
    source of its pixel spacing and its non-zero mask values."""
    found = dict(problems=[], warnings=[], size=None, bits=None, spacing="none", values=[])
    path, mask_path = dataset.images[case_id], dataset.masks.get(case_id) if with_mask else None
    try:
        image, found["bits"] = read_image(path)
        found["size"] = image.shape
        found["warnings"] = [w for w in [constant_warning(image, path)] if w]
        spacing = dataset.spacing(case_id)
        found["spacing"] = "none" if spacing is None else spacing[2]
    except UserError as err:
        found["problems"].append(str(err))
    if mask_path is not None:
        try:
            mask = read_mask(mask_path, found["size"], path)
            dataset.classes.labels(mask, mask_path)
            found["values"] = present_values(mask)
        except UserError as err:
            found["problems"].append(str(err))
    return found


def check_folder(root: Path, classes, split: dict | None = None) -> dict:
    """Every problem of a dataset folder in one UserError: its listing, its splits.json, and every
    image of `split` (default: all images), decoded on all cores, with the masks of all images, or
    of a split's labelled and validation ids only: a training stage never opens the masks of the
    unlabelled split (a semi-supervised method must not have them) nor of the test split
    (evaluate.py checks those as it reads them). Without a problem, a summary of the cases: their
    number, masks, sizes, bit depths, spacing sources, non-zero mask values and warnings."""
    root = Path(root)
    images, masks, problems = scan(root)
    if (root / "splits.json").exists():
        try:
            read_splits(root / "splits.json", images, masks)
        except UserError as err:
            problems.append(str(err))
    ids = sorted(images) if split is None else sorted({i for key in SPLIT_KEYS for i in split[key]})
    missing = [i for i in ids if i not in images]
    unmasked = [i for key in ("labeled", "val", "test") for i in (split or {}).get(key, [])
                if i in images and i not in masks]   # an id without an image is listed once, above
    if missing or unmasked:
        problems.append(f"--data {root}: the split's ids {few(missing + unmasked)} have no image or mask any more")
    dataset = Dataset(images, masks, classes, root)
    readable = set(ids) if split is None else {i for key in ("labeled", "val") for i in split[key]}
    found = in_parallel(lambda case_id: check_case(dataset, case_id, case_id in readable),
                        [i for i in ids if i in images])
    problems += [p for f in found for p in f["problems"]]
    if problems:
        raise problems_error(problems, f"--data {root}")
    return dict(cases=len(found), masks=sum(i in masks for i in ids), masks_read=len(readable & set(masks)),
                sizes=collections.Counter(f"{f['size'][0]}x{f['size'][1]}" for f in found),
                bits=collections.Counter(f["bits"] for f in found),
                spacing=collections.Counter(f["spacing"] for f in found),
                mask_values=sorted({v for f in found for v in f["values"]}),
                warnings=[w for f in found for w in f["warnings"]])


def verified(root: Path, classes, split: dict | None, trusted: str | None):
    """(fingerprint of the dataset folder, check_folder's summary or None): the folder is checked
    unless `trusted`, the fingerprint a checkpoint stored, shows it unchanged since then."""
    now = fingerprint(root)
    return now, None if now == trusted else check_folder(root, classes, split)


def upstream_dataset(root: Path, ckpt: dict, flag: str, path):
    """(dataset, split, fingerprint) of a later stage: the split and classes of its upstream checkpoint
    (a splits.json or classes.json in --data that disagrees is an error), the files checked again
    only if the folder changed since that checkpoint was trained."""
    classes = inherited_classes(ckpt, flag, path, root)
    now, _ = verified(root, classes, ckpt["split"], ckpt.get("data_fingerprint"))
    split = inherited_split(ckpt, flag, path, root)
    return Dataset.open(root, classes), split, now


def counted(counter) -> str:
    return ", ".join(f"{k} ({n})" for k, n in counter.most_common(5)) + (" ..." if len(counter) > 5 else "")


@exit_on_user_error
def main(argv=None):
    ap = OneLineParser(prog="python -m data.check", description=__doc__.split("\n\n")[0]
                       + " Prints a summary of the dataset, or every problem of it, one a line.")
    ap.add_argument("--data", type=Path, required=True, help="dataset folder with images/ (masks/, splits.json "
                                                             "and classes.json optional)")
    ap.add_argument("--classes", nargs="+", metavar="VALUE=NAME", help="the classes, for a dataset without "
                                                                       "classes.json, e.g. 1=left 2=right")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if not args.data.is_dir():
        raise UserError(f"--data {args.data}: no such folder")
    classes = dataset_classes(args.data, args.classes)
    summary = check_folder(args.data, classes)
    splits = "valid" if (args.data / "splits.json").exists() else "none"
    classes = observed(classes, summary["mask_values"])
    print(f"{args.data}: {summary['cases']} cases, {summary['masks']} with a mask; classes: {classes.describe()}; "
          f"mask values: {', '.join(map(str, summary['mask_values'])) or 'none'}; sizes: {counted(summary['sizes'])}; "
          f"bits: {counted(summary['bits'])}; pixel spacing: {counted(summary['spacing'])}; splits.json: {splits}; "
          f"no problems (checked in {time.perf_counter() - start:.1f} s)")
    for warning in summary["warnings"]:
        warn(warning)


if __name__ == "__main__":
    main()
