"""The dataset check: every file an experiment will use, decoded once, before anything trains.

    python -m data.check --data DIR [--classes 1=left 2=right] [--seed S --labeled-ratio R ...]

The teacher, the first stage of an experiment, decodes every image and mask of its split and
checks them (decodable, a 2-D gray or RGB image or a grey DICOM radiograph, finite pixel
values, masks of their image's size holding only the dataset's classes) and refuses the dataset
with one message naming every bad file; a constant image is a warning. The masks of unlabelled
and test cases are checked too, for their format only: their pixels are dropped once their size
and values are known, and no stage trains on them or selects with them. The teacher stores a
fingerprint of the folder (the names, sizes and modification times of its files) in its
checkpoint, and each later stage stores the one it trusted: a later stage whose --data still has
that fingerprint skips the check, and one whose data changed checks it again.
"""
import collections
import hashlib
import os
import time
from pathlib import Path

from errors import OneLineParser, UserError, exit_on_user_error, problems_error

from .classes import dataset_classes, inherited_classes, observed, present_values
from .dataset import FORMAT_CHECK, Dataset, constant_warning, few, in_parallel, read_image, read_mask, scan, warn
from .split import SPLIT_KEYS, TEST_FRACTION, VAL_FRACTION, describe_split, inherited_split, new_split, read_splits

FINGERPRINTED = ("images", "masks", "splits.json", "classes.json")


def fingerprint(root) -> str:
    """A hash of the names, sizes and modification times of the files that make up a dataset (of a
    link that loops or points nowhere, its own, so that the check, not this hash, names it)."""
    lines = []
    for name in FINGERPRINTED:
        path = Path(root) / name
        entries = sorted(os.scandir(path), key=lambda e: e.name) if path.is_dir() else [path] if path.exists() else []
        for entry in entries:
            if not entry.name.startswith("."):
                try:
                    stat = entry.stat()
                except OSError:
                    stat = entry.stat(follow_symlinks=False)
                lines.append(f"{name}/{entry.name}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def check_case(dataset: Dataset, case_id: str) -> dict:
    """Decode one case's image and mask, if it has one (for its format only): its problems, warnings,
    size, bit depth, the source of its pixel spacing and its non-zero mask values."""
    found = dict(problems=[], warnings=[], size=None, bits=None, spacing="none", values=[])
    path, mask_path = dataset.images[case_id], dataset.masks.get(case_id)
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
            mask = read_mask(mask_path, found["size"], path, FORMAT_CHECK)
            dataset.classes.labels(mask, mask_path)
            found["values"] = present_values(mask)
        except UserError as err:
            found["problems"].append(str(err))
    return found


def check_folder(root: Path, classes, split: dict | None = None) -> dict:
    """Every problem of a dataset folder in one UserError: its listing, its splits.json, and every
    image of `split` (default: all images) with its mask, decoded on all cores. The masks of the
    unlabelled and test cases are checked like the others, for their format (size and values)
    only, so that a bad one is found before training rather than by evaluate.py after it. Without
    a problem, a summary of the cases: their number, masks, sizes, bit depths, spacing sources,
    non-zero mask values and warnings."""
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
    found = in_parallel(lambda case_id: check_case(dataset, case_id), [i for i in ids if i in images])
    problems += [p for f in found for p in f["problems"]]
    if problems:
        raise problems_error(problems, f"--data {root}")
    return dict(cases=len(found), masks=sum(i in masks for i in ids),
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


def unmasked_classes(classes, values) -> list:
    """The names of the declared classes whose value no mask holds: nothing can learn or score them."""
    return [n for v, n in zip(classes.values, classes.names) if classes.declared and v not in values]


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(text)
    return value


@exit_on_user_error
def main(argv=None):
    ap = OneLineParser(prog="python -m data.check", description=__doc__.split("\n\n")[0]
                       + " Prints a summary of the dataset and the split train_teacher.py would draw with the same "
                         "flags, or every problem of it, one a line.")
    ap.add_argument("--data", type=Path, required=True, help="dataset folder with images/ (masks/, splits.json "
                                                             "and classes.json optional)")
    ap.add_argument("--classes", nargs="+", metavar="VALUE=NAME", help="the classes, for a dataset without "
                                                                       "classes.json, e.g. 1=left 2=right")
    ap.add_argument("--seed", type=int, default=0, help="the teacher's --seed, for the split shown (default 0)")
    ap.add_argument("--labeled-ratio", type=fraction, help="the teacher's --labeled-ratio, for the split shown "
                                                           "(default: every masked training case labelled)")
    ap.add_argument("--test-fraction", type=fraction, default=TEST_FRACTION, help="the teacher's --test-fraction "
                                                                                  f"(default {TEST_FRACTION})")
    ap.add_argument("--val-fraction", type=fraction, default=VAL_FRACTION, help="the teacher's --val-fraction "
                                                                                f"(default {VAL_FRACTION})")
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
    split = new_split(args.data, args.seed, args.labeled_ratio, args.test_fraction, args.val_fraction)
    dataset = Dataset.open(args.data)
    print(describe_split(split, dataset.images, dataset.masks))
    for warning in summary["warnings"] + dataset_warnings(classes, summary["mask_values"], split, dataset.images):
        warn(warning)


def dataset_warnings(classes, values, split: dict, images) -> list:
    """What a run on the dataset would silently lose: declared classes no mask holds, images a
    splits.json leaves out."""
    warnings = [f"class {name!r} is in no mask: it is left out of every mean (add masks holding it, or remove "
                f"it from the classes)" for name in unmasked_classes(classes, values)]
    left_out = set(images) - {i for key in SPLIT_KEYS for i in split[key]}
    if left_out:
        warnings.append(f"splits.json lists {len(left_out)} of the {len(images)} images in none of its lists "
                        f"({few(left_out)}): they are used nowhere")
    return warnings


if __name__ == "__main__":
    main()
