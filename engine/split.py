"""One resolved split per experiment: made by the teacher stage, carried by every checkpoint."""
from data import resolve_split

from .errors import UserError

SPLIT_KEYS = ("labeled", "unlabeled", "val", "test")
DEFAULT_RATIO = 0.1


def new_split(root, seed: int, labeled_ratio: float | None) -> dict:
    """The teacher's split: from root/splits.json (which fixes the labelled set, so a
    --labeled-ratio is an error there), else drawn by `seed` with `labeled_ratio` (default 0.1)."""
    fixed = (root / "splits.json").exists()
    if fixed and labeled_ratio is not None:
        raise UserError(f"--labeled-ratio {labeled_ratio}: {root / 'splits.json'} fixes the labelled set; "
                        f"drop the flag or remove splits.json")
    ratio = None if fixed else DEFAULT_RATIO if labeled_ratio is None else labeled_ratio
    if ratio is not None and not 0 < ratio <= 1:
        raise UserError(f"--labeled-ratio {ratio}: must be in (0, 1]")
    split = resolve_split(root, seed=seed, labeled_ratio=ratio or DEFAULT_RATIO)
    return dict(split, seed=seed, labeled_ratio=ratio)


def inherited_split(ckpt: dict, flag: str, path, labeled_ratio: float | None, root) -> dict:
    """The split stored in an upstream checkpoint; a conflicting --labeled-ratio, or a
    splits.json in --data that disagrees with it, is an error."""
    split = ckpt["split"]
    if (root / "splits.json").exists():
        fixed = resolve_split(root)
        if any(sorted(fixed[k]) != sorted(split[k]) for k in SPLIT_KEYS):
            raise UserError(f"{root / 'splits.json'} differs from the split {flag} {path} was trained on; "
                            f"use the --data that teacher was trained on")
    if labeled_ratio is not None and labeled_ratio != split["labeled_ratio"]:
        raise UserError(f"--labeled-ratio {labeled_ratio} conflicts with {flag} {path}, trained with "
                        f"{split['labeled_ratio']}; drop the flag or retrain the teacher")
    return split
