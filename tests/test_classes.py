"""Several classes: declared in classes.json or --classes, read from masks by value, refined and
scored per class; a two-class phantom runs through every stage of reproduce.py's micro profile and
predict.py. Binary datasets keep today's names and numbers."""
import csv
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import predict

from data.classes import binary, dataset_classes, from_record, observed
from engine.metrics import binary_mask_metrics, class_means, class_metrics
from errors import UserError
from nets.cyclegan import ResnetGenerator, foreground_logit, refine_logits
from reproduction.plan import PROFILES
from reproduction.tables import collect, render, table_specs


def test_classes_json_and_the_classes_flag(tmp_path):
    assert dataset_classes(tmp_path) == binary()
    (tmp_path / "classes.json").write_text('{"2": "right sinus", "1": "left sinus"}')
    classes = dataset_classes(tmp_path)
    assert classes.values == (1, 2) and classes.names == ("left sinus", "right sinus") and classes.outputs == 3
    assert from_record(json.loads(json.dumps(classes.record()))) == classes
    with pytest.raises(UserError, match="declares the classes already"):
        dataset_classes(tmp_path, ["1=left"])
    for text, message in [('{"0": "air"}', "is not a mask value"), ('{"1": ""}', "needs a name"),
                          ('{"1": "a", "2": "a"}', "share a name"), ("[1, 2]", "must be an object"),
                          (json.dumps({str(v): f"c{v}" for v in range(1, 9)}), "at most 7")]:
        (tmp_path / "classes.json").write_text(text)
        with pytest.raises(UserError, match=message):
            dataset_classes(tmp_path)
    (tmp_path / "classes.json").unlink()
    assert dataset_classes(tmp_path, ["10=sinus", "20=thickening"]).values == (10, 20)
    with pytest.raises(UserError, match="VALUE=NAME"):
        dataset_classes(tmp_path, ["left"])


def test_masks_are_read_as_class_indices_and_undeclared_values_are_named(tmp_path):
    mask = np.array([[0, 10, 20], [20, 0, 10]], np.uint8)
    declared = dataset_classes(tmp_path, ["10=sinus", "20=thickening"])
    np.testing.assert_array_equal(declared.labels(mask, tmp_path / "m.png"), [[0, 1, 2], [2, 0, 1]])
    mask[0, 0] = 30
    with pytest.raises(UserError, match=r"m.png: mask values 30 are not declared classes"):
        declared.labels(mask, tmp_path / "m.png")
    with pytest.raises(UserError, match=r"m.png: mask values 0, 10, 20, 30 are not \{0, k\}"):
        binary().labels(mask, tmp_path / "m.png")
    np.testing.assert_array_equal(binary().labels(np.array([[0, 7]], np.uint16), tmp_path), [[0, 1]])
    # a binary dataset's predictions are written with the value its masks share, 255 if they differ
    assert observed(binary(), [1]).values == (1,) and observed(binary(), [1, 255]).values == (255,)
    assert observed(declared, [10]) == declared


def test_refinement_keeps_the_teachers_split_of_the_foreground():
    torch.manual_seed(0)
    generator = ResnetGenerator(width=4, blocks=1, map_temperature=2.0).eval()
    torch.nn.init.normal_(generator.net[-1].weight, std=0.1)
    t = generator.map_temperature
    images = torch.rand(2, 1, 16, 32)
    two = torch.randn(2, 2, 16, 32)
    refined = refine_logits(generator, images, two)
    r = t * generator(torch.cat([images, torch.sigmoid((two[:, 1:] - two[:, :1]) / t)], 1))
    torch.testing.assert_close(refined, torch.cat([torch.zeros_like(r), r], 1))   # binary: [0, r]
    three = torch.randn(2, 3, 16, 32) * 3
    p, q = refine_logits(generator, images, three).softmax(1), three.softmax(1)
    fg = torch.sigmoid(foreground_logit(three) / t)
    torch.testing.assert_close(fg, 1 - q[:, :1] ** (1 / t) / (q[:, :1] ** (1 / t) + (1 - q[:, :1]) ** (1 / t)),
                               atol=1e-4, rtol=0)
    r = t * generator(torch.cat([images, fg], 1))[:, 0]
    assert torch.allclose(p[:, 0], 1 - torch.sigmoid(r), atol=1e-6)
    assert torch.allclose(p[:, 1:] / p[:, 1:].sum(1, keepdim=True), q[:, 1:] / q[:, 1:].sum(1, keepdim=True), atol=1e-6)


def test_metrics_per_class_and_their_mean():
    target = torch.zeros(1, 20, 30, dtype=torch.long)
    target[0, 2:8, 2:10], target[0, 10:18, 15:25] = 1, 2
    pred = target.clone()
    pred[0, 2:8, 2:6] = 0                       # half of class 1 missed
    assert class_metrics(pred, target, ["sinus"]) == binary_mask_metrics(pred == 1, target == 1)
    both = class_metrics(pred, target, ["left", "right"])
    assert both["dice[left]"] == binary_mask_metrics(pred == 1, target == 1)["dice"] == [2 / 3]
    assert both["dice[right]"] == [1.0] and both["hd95[right]"] == [0.0]
    means = class_means(both, ["left", "right"])
    assert means["dice"] == pytest.approx([(2 / 3 + 1) / 2]) and means["hd95"] == pytest.approx(
        [(both["hd95[left]"][0] + 0) / 2])
    assert class_means(both, ["right"])["dice"] == [1.0]


def test_tables_add_a_row_per_class():
    def run(row, dice):
        metrics = {m: dict(mean=v, std=0.0) for m, v in [("dice", sum(dice) / 2), ("dice[left sinus]", dice[0]),
                                                          ("dice[right sinus]", dice[1])]}
        return dict(seed=0, cells=[["table2", row]], metrics=metrics, cases=dict(id=[], dice=[]))
    results = {"runs": {"a": run("none, plain", (0.8, 0.6)), "b": run("ssim, refined", (0.9, 0.7))}}
    spec = dict(table_specs(PROFILES["micro"])["table2"], metrics=["dice"])
    md, table_csv = render("table2", spec, collect(results), "caption")
    assert "| ssim, refined · left sinus | 1 | 0.9000 ± 0.0000 |" in md
    assert "| none, plain · right sinus | 1 | 0.6000 ± 0.0000 |" in md
    assert '"none, plain",dice[right sinus],0.6,0,1' in table_csv


def test_a_two_class_phantom_runs_through_every_stage(micro_reproduction):
    """The session's micro reproduction runs on a two-class phantom (left and right sinus)."""
    data, micro, _ = micro_reproduction
    assert json.loads((data / "classes.json").read_text()) == {"1": "left sinus", "2": "right sinus"}
    left, right = [np.stack([iio.imread(p) for p in sorted((data / "masks").iterdir())])[..., s]
                   for s in (slice(0, 32), slice(32, 64))]
    assert set(np.unique(left)) == {0, 1} and set(np.unique(right)) == {0, 2}      # as seen in the image
    for name in ("teacher", "cyclegan", "student-kd-ssim-refined", "student-mean_teacher"):
        ckpt = torch.load(micro / "seed0/r0300" / f"{name}.pt", weights_only=True)
        assert ckpt["classes"]["names"] == ["left sinus", "right sinus"]
        if name != "cyclegan":
            assert ckpt["config"]["num_classes"] == 3
    results = json.loads((micro / "results.json").read_text())
    for run in (r for r in results["runs"].values() if r["script"] == "evaluate"):
        for metric in ("dice", "hd95"):
            assert {metric, f"{metric}[left sinus]", f"{metric}[right sinus]"} <= set(run["metrics"])
        assert len(run["cases"]["dice[left sinus]"]) == len(run["cases"]["dice"])
    table1 = (micro / "table1.md").read_text()
    assert "| wkd_refine · left sinus |" in table1 and "| teacher · right sinus |" in table1
    with open(micro / "seed0/r0300/teacher_test_eval/metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["dice"]) == pytest.approx((float(row["dice[left sinus]"]) + float(row["dice[right sinus]"])) / 2)


def test_predict_writes_each_class_with_its_mask_value(micro_reproduction, tmp_path):
    data, micro, _ = micro_reproduction
    student = micro / "seed0/r0300/student-kd-ssim-refined.pt"
    predict.main([str(a) for a in ("--ckpt", student, "--images", data / "images", "--out",
                                   tmp_path / "p", "--probabilities")])
    masks = [iio.imread(p) for p in sorted((tmp_path / "p/masks").iterdir())]
    assert len(masks) == 20 and set(np.unique(masks)) <= {0, 1, 2}
    with open(tmp_path / "p/areas.csv") as f:
        row = next(csv.DictReader(f))
    assert list(row) == ["id", "height", "width", "spacing_row_mm", "spacing_col_mm", "spacing_source",
                         "area_px[left sinus]", "area_px[right sinus]", "area_mm2[left sinus]", "area_mm2[right sinus]"]
    assert row["spacing_source"] == "none (pixels)" and row["area_mm2[left sinus]"] == ""
    assert int(row["area_px[right sinus]"]) == (masks[0] == 2).sum()
    assert (tmp_path / "p/probabilities/case_0000_2.png").is_file()
