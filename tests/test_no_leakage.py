"""No training stage reads the pixels of a mask it must not have: those of the unlabelled split (a
semi-supervised method does not have them; the phantom does) and of the test split.

Every file the data code decodes is recorded (the `opened` fixture), with why (its pixels, or
only its format), while the teacher, the refiner and the students of every method (KD refined
and post-processed included) run in this process; no mask of an unlabelled or test case may be
decoded for its pixels. Their format (size and values) is checked by the teacher, before any
training, which is checked to happen; so is reading the labelled and validation masks, so that
the recording cannot pass by recording nothing. The two oracle upper bounds
(`train_student.py --oracle`) are the one exception: they read the unlabelled masks' pixels, and
are checked to read those and no test mask's.
"""
import pytest
import torch
from conftest import script_state

import train_cyclegan
import train_student
import train_teacher
from objectives import OBJECTIVES
from data.dataset import FORMAT_CHECK, PIXELS

TINY = ["--steps", "2", "--val-every", "2", "--batch-size", "2", "--device", "cpu"]


def test_stages_never_open_unlabelled_or_test_masks(tiny_data, tmp_path, opened):
    with script_state():          # the plain torch kernels a user's run takes; global state restored after
        teacher = run_everything(tiny_data, tmp_path)

    split = torch.load(teacher, weights_only=True)["split"]
    masks = {p.stem for p, purpose in opened if p.parent.name == "masks" and purpose == PIXELS}
    assert not masks & set(split["unlabeled"]), "an unlabelled mask was read"
    assert not masks & set(split["test"]), "a test mask was read"
    assert set(split["labeled"]) <= masks and set(split["val"]) <= masks
    checked = {p.stem for p, purpose in opened if p.parent.name == "masks" and purpose == FORMAT_CHECK}
    assert set(split["unlabeled"]) | set(split["test"]) <= checked, "a mask's format went unchecked"


@pytest.mark.parametrize("oracle", ["weight", "targets"])
def test_the_oracle_upper_bounds_read_the_unlabelled_masks_and_no_test_mask(tiny_data, tiny_teacher, tmp_path,
                                                                             opened, oracle):
    with script_state():
        train_student.main(["--data", str(tiny_data), "--teacher", str(tiny_teacher), "--method", "kd", "--oracle",
                            oracle, "--out", str(tmp_path / "oracle.pt"), "--width", "4",
                            "--unlabeled-batch-size", "2", *TINY])
    split = torch.load(tiny_teacher, weights_only=True)["split"]
    masks = {p.stem for p, purpose in opened if p.parent.name == "masks" and purpose == PIXELS}
    assert set(split["unlabeled"]) <= masks and not masks & set(split["test"])


def run_everything(tiny_data, tmp_path):
    teacher, refiner = tmp_path / "teacher.pt", tmp_path / "cyclegan.pt"
    train_teacher.main(["--data", str(tiny_data), "--out", str(teacher), "--width", "4", "--labeled-ratio", "0.4",
                        "--size", "32", "64", *TINY])
    train_cyclegan.main(["--data", str(tiny_data), "--teacher", str(teacher), "--out", str(refiner), "--width", "4",
                         "--blocks", "1", "--disc-width", "4", "--disc-layers", "1", *TINY])
    runs = [(m, ["--refiner", str(refiner)] if o.refine else []) for m, o in OBJECTIVES.items()] + [
        ("wkd", ["--postprocess"]), ("wkd_refine", ["--refiner", str(refiner), "--refiner-gate"])]
    for k, (method, extra) in enumerate(runs):
        train_student.main(["--data", str(tiny_data), "--teacher", str(teacher), "--method", method, "--out",
                            str(tmp_path / f"{method}{k}.pt"), "--width", "4", "--unlabeled-batch-size", "2", *TINY,
                            *extra])
    return teacher
