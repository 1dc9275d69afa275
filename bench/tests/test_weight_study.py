"""The KD-weight study looks at the labelled validation masks only: it never decodes the pixels
of an unlabelled or a test case's mask (every file the data code decodes is recorded, with why,
by the `opened` fixture, while the study runs in this process)."""
import json

import torch

import train_student
import train_teacher
from bench import weight_study
from data.dataset import PIXELS
from tests.conftest import script_state

TINY = ["--steps", "2", "--val-every", "2", "--batch-size", "2", "--device", "cpu", "--width", "4"]


def test_the_study_reads_the_validation_masks_and_no_unlabelled_or_test_mask(tiny_data, tmp_path, opened):
    teacher, student, out = tmp_path / "teacher.pt", tmp_path / "student.pt", tmp_path / "study.json"
    with script_state():
        train_teacher.main(["--data", str(tiny_data), "--out", str(teacher), "--labeled-ratio", "0.4",
                            "--size", "32", "64", *TINY])
        train_student.main(["--data", str(tiny_data), "--teacher", str(teacher), "--method", "wkd", "--out",
                            str(student), "--unlabeled-batch-size", "2", *TINY])
        opened.clear()                  # from here on, what the study decodes
        weight_study.main(["--data", str(tiny_data), "--teacher", str(teacher), "--student", f"start={teacher}",
                           "--student", f"2={student}", "--out", str(out)])

    split = torch.load(teacher, weights_only=True)["split"]
    masks = {p.stem for p, purpose in opened if p.parent.name == "masks" and purpose == PIXELS}
    assert not masks & set(split["unlabeled"]), "an unlabelled mask was read"
    assert not masks & set(split["test"]), "a test mask was read"
    assert set(split["val"]) <= masks                   # the recording saw the study read
    assert json.loads(out.read_text())["cases"] == len(split["val"])
