"""One resolved split per experiment: made by the teacher stage, carried by every checkpoint."""
from data import resolve_split

from .errors import UserError


def new_split(root, seed: int, labeled_ratio: float) -> dict:
    if not 0 < labeled_ratio <= 1:
        raise UserError(f"--labeled-ratio {labeled_ratio}: must be in (0, 1]")
    split = resolve_split(root, seed=seed, labeled_ratio=labeled_ratio)
    return dict(split, seed=seed, labeled_ratio=labeled_ratio)


def inherited_split(ckpt: dict, flag: str, path, labeled_ratio: float | None) -> dict:
    """The split stored in an upstream checkpoint; a conflicting --labeled-ratio is an error."""
    split = ckpt["split"]
    if labeled_ratio is not None and abs(labeled_ratio - split["labeled_ratio"]) > 1e-9:
        raise UserError(f"--labeled-ratio {labeled_ratio} conflicts with {flag} {path}, trained with "
                        f"{split['labeled_ratio']}; drop the flag or retrain the teacher")
    return split
