"""The segmentation classes of a dataset: which mask values are which structure.

    DIR/classes.json    optional: {"1": "left sinus", "2": "right sinus"}, mask value -> name

Without a declaration a dataset is binary, as the data contract has always said: in each mask
any one non-zero value is the sinus. Declared classes are exact: a mask may hold 0 and the
declared values only. The class list is resolved by the teacher and stored in every checkpoint,
so that later stages, evaluation and prediction use the same classes in the same order
(network output c is the class at position c - 1; output 0 is the background).
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from errors import UserError

MAX_CLASSES = 7            # with the background, 8 network outputs: what the KD kernels handle
UNDECLARED_VALUE = 255     # what predictions of a binary dataset are written with, unless its masks say


@dataclasses.dataclass(frozen=True)
class Classes:
    values: tuple       # mask value of each foreground class, ascending
    names: tuple
    declared: bool      # False: binary, any single non-zero mask value is the sinus

    @property
    def outputs(self) -> int:
        """Network outputs: the background and one per class."""
        return len(self.values) + 1

    def labels(self, mask: np.ndarray, path: Path) -> np.ndarray:
        """Class indices (uint8, 0 = background) of a 2-D mask read from `path`."""
        values = present_values(mask)
        if not self.declared:
            if len(values) > 1:
                raise UserError(f"{path}: mask values {shown(values, with_zero=True)} are not {{0, k}}; save a binary "
                                f"mask (0 background, one value for sinus) or declare the classes in classes.json")
            return (mask != 0).astype(np.uint8)
        unknown = sorted(set(values) - set(self.values))
        if unknown:
            raise UserError(f"{path}: mask values {shown(unknown)} are not declared classes "
                            f"({', '.join(f'{v} {n}' for v, n in zip(self.values, self.names))}); fix the mask "
                            f"or classes.json")
        lut = np.zeros(max(self.values) + 1, np.uint8)
        lut[list(self.values)] = np.arange(1, len(self.values) + 1)
        return lut[mask]

    def record(self) -> dict:
        """Plain values, as stored in checkpoints."""
        return dict(values=list(self.values), names=list(self.names), declared=self.declared)

    def describe(self) -> str:
        if not self.declared:
            return f"binary (sinus = the non-zero mask value, written as {self.values[0]})"
        return ", ".join(f"{v} = {n}" for v, n in zip(self.values, self.names))


def binary(value: int = UNDECLARED_VALUE) -> Classes:
    return Classes((int(value),), ("sinus",), declared=False)


def observed(classes: Classes, values) -> Classes:
    """Undeclared binary classes written with the one non-zero value all masks share, if they do."""
    return binary(values[0]) if not classes.declared and len(values) == 1 else classes


def from_record(record: dict | None) -> Classes:
    """The classes stored in a checkpoint; checkpoints from before classes existed are binary."""
    if record is None:
        return binary()
    return Classes(tuple(record["values"]), tuple(record["names"]), bool(record["declared"]))


def present_values(mask: np.ndarray) -> list:
    """The non-zero values of a mask, ascending (selecting the few non-zero pixels first is fast)."""
    return [int(v) for v in np.unique(mask[mask != 0])]


def shown(values, with_zero=False, k=8) -> str:
    values = ([0] if with_zero else []) + list(values)
    return ", ".join(map(str, values[:k])) + (", ..." if len(values) > k else "")


def declared(pairs: dict, where: str) -> Classes:
    """Classes from {mask value: name} as written in classes.json or given to --classes."""
    if not pairs:
        raise UserError(f"{where}: declares no classes; name at least one mask value")
    items = []
    for key, name in pairs.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            value = -1
        if not 1 <= value <= 65535 or str(value) != str(key).strip():
            raise UserError(f"{where}: {key!r} is not a mask value; use integers 1 to 65535 (0 is the background)")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: mask value {value} needs a name")
        items.append((value, name.strip()))
    items.sort()
    names = [n for _, n in items]
    if len(set(names)) < len(names):
        raise UserError(f"{where}: two classes share a name; give each its own")
    if len(items) > MAX_CLASSES:
        raise UserError(f"{where}: {len(items)} classes; at most {MAX_CLASSES} (with the background, 8 network "
                        f"outputs) are supported")
    return Classes(tuple(v for v, _ in items), tuple(names), declared=True)


def read_classes_json(path: Path) -> Classes:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err}); fix or remove it") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must be an object mapping mask values to names, e.g. "
                        '{"1": "left sinus", "2": "right sinus"}')
    return declared(raw, str(path))


def parse_classes_flag(items) -> Classes:
    """--classes 1=left 2=right."""
    pairs = {}
    for item in items:
        value, sep, name = item.partition("=")
        if not sep:
            raise UserError(f"--classes {item}: write each class as VALUE=NAME, e.g. 1=left 2=right")
        if value in pairs:
            raise UserError(f"--classes: mask value {value} is named twice")
        pairs[value] = name
    return declared(pairs, "--classes")


def dataset_classes(root: Path, flag=None) -> Classes:
    """The classes a dataset declares (classes.json) or --classes gives; binary without either."""
    path = Path(root) / "classes.json"
    if flag is not None and path.exists():
        raise UserError(f"--classes: {path} declares the classes already; drop the flag or remove the file")
    if flag is not None:
        return parse_classes_flag(flag)
    return read_classes_json(path) if path.exists() else binary()


def inherited_classes(ckpt: dict, flag: str, path, root: Path) -> Classes:
    """The classes stored in an upstream checkpoint; a classes.json in --data that disagrees with them
    is an error."""
    classes = from_record(ckpt.get("classes"))
    json_path = Path(root) / "classes.json"
    if json_path.exists():
        here = read_classes_json(json_path)
        if (here.values, here.names) != (classes.values, classes.names) or not classes.declared:
            raise UserError(f"{json_path} differs from the classes {flag} {path} was trained on "
                            f"({classes.describe()}); use the --data that network was trained on")
    return classes
