"""The model card: the template filled with a run's settings, data, classes and validation numbers."""
import dataclasses
from pathlib import Path

from data.classes import declared
from engine.card import TEMPLATE, write_model_card


@dataclasses.dataclass
class Settings:
    data: Path
    out: Path
    method: str = "wkd_refine"
    lr: float = 0.001


def test_the_card_holds_the_run_and_its_intended_use(tiny_data, tmp_path):
    split = dict(labeled=["a", "b"], unlabeled=["c", "d", "e"], val=["f"], test=["g", "h"], seed=0, labeled_ratio=0.4)
    classes = declared({"1": "left sinus", "2": "right sinus"}, "test")
    path = write_model_card(tmp_path, Settings(tiny_data, tmp_path / "student.pt"), split, classes, "ab12" * 16,
                            dict(dice=0.81234, hd95=4.5, step=300), kind="student", checkpoint=tmp_path / "student.pt",
                            size=(128, 256), code_version="0123abc", method="wkd_refine (weight ssim, refined)")
    card = path.read_text()
    assert path == tmp_path / "MODEL_CARD.md" and "$" not in card and "$" in TEMPLATE.read_text()
    assert card.startswith("# Model card: sinus-wkd student `student.pt`")
    assert "Research; not for clinical decisions." in card
    assert "trained on the procedural phantom" in card            # tiny_data is a phantom
    for line in ("- Split sizes: labeled 2, unlabeled 3, val 1, test 2", f"`{'ab12' * 16}`",
                 "- Classes (mask value = name): 1 = left sinus, 2 = right sinus", "| `dice` | 0.8123 |",
                 "| `lr` | 0.001 |", "at step 300, on 1 validation cases", "128 x 256", "`0123abc`"):
        assert line in card, line
    assert all(line == line.rstrip() for line in card.splitlines())
    assert "`data`" not in card and "`out`" not in card          # paths of this machine stay out of the table
