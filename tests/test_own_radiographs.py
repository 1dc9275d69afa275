"""A user's own folder of radiographs: every mask is used and the split is printed; the first stage
finds every bad file (the masks of unlabelled and test cases by their format); links that loop or
dangle are one line in every stage; no mean mixes mm with pixels or counts a class no mask holds;
the student takes its teacher's width and flips; shared outputs name no folder of this machine;
overlays are readable at full size."""
import csv
import json
import os
import pathlib
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import TINY, run_main
from test_cli_errors import assert_one_line_error
from test_curves import fake_stage
from test_dicom import dicom, save

import evaluate
from data import prepare_dataset, resolve_split
from data.phantom import generate
from engine.metrics import dice_score

FAST = ["--steps", 2, "--val-every", 2, "--batch-size", 2, *TINY]


def own_folder(tiny_data, root, n=14, masked=8):
    """`n` of the tiny phantom's images, the first `masked` with their masks, and no phantom.json: a
    folder as a user lays it out."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        shutil.copy(tiny_data / "images" / f"case_{i:04d}.png", root / "images")
        if i < masked:
            shutil.copy(tiny_data / "masks" / f"case_{i:04d}.png", root / "masks")
    return root


def teacher(data, out, *extra):
    proc = run_main("train_teacher.py", "--data", data, "--out", out, "--width", 4, *FAST, *extra)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_every_mask_is_used_and_the_split_is_printed(tiny_data, tmp_path):
    data = own_folder(tiny_data, tmp_path / "own")
    printed = teacher(data, tmp_path / "teacher.pt").stdout
    split = torch.load(tmp_path / "teacher.pt", weights_only=True)["split"]
    assert len(split["labeled"]) == 5 and len(split["val"]) == 1 and len(split["test"]) == 2   # 8 masks
    assert split["unlabeled"] == [f"case_{i:04d}" for i in range(8, 14)]                         # the 6 without
    assert "split (drawn by --seed 0, --labeled-ratio 1): 14 images, 8 with a mask" in printed
    assert f"labelled       5: {', '.join(split['labeled'])}" in printed
    assert f"test           2: {', '.join(split['test'])}" in printed
    assert "unlabelled     6: 6 without a mask" in printed
    checked = run_main("data/check.py", "--data", data)
    assert f"labelled       5: {', '.join(split['labeled'])}" in checked.stdout
    # the phantom, whose every case has a mask, keeps a tenth labelled
    assert "--labeled-ratio 0.1)" in run_main("data/check.py", "--data", tiny_data).stdout


def test_the_teacher_finds_bad_masks_of_unlabelled_and_test_cases(tiny_data, tmp_path):
    data = own_folder(tiny_data, tmp_path / "own")
    split = resolve_split(data, 0, 0.5, 0.2, 0.1)
    test_id = split["test"][0]
    unlabelled_id = next(i for i in split["unlabeled"] if (data / "masks" / f"{i}.png").exists())
    iio.imwrite(data / "masks" / f"{test_id}.png", np.zeros((10, 12), np.uint8))
    values = iio.imread(data / "masks" / f"{unlabelled_id}.png")
    values[0, :2] = (3, 4)
    iio.imwrite(data / "masks" / f"{unlabelled_id}.png", values)
    proc = run_main("train_teacher.py", "--data", data, "--out", tmp_path / "t.pt", "--labeled-ratio", 0.5, *FAST)
    assert proc.returncode == 2 and "2 problems" in proc.stderr
    assert f"{test_id}.png: mask is 10x12" in proc.stderr and f"{unlabelled_id}.png: mask values 0, 3, 4" in proc.stderr
    assert not (tmp_path / "t.pt").exists()


def test_links_that_loop_or_dangle_are_one_line_in_every_stage(tiny_data, tiny_teacher, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "images" / "zz_gone.png").symlink_to(data / "images" / "nowhere.png")
    (data / "masks" / "zz_loop.png").symlink_to(data / "masks" / "zz_loop.png")
    runs = [("train_teacher.py", "--data", data, "--out", tmp_path / "t.pt", *FAST),
            ("train_cyclegan.py", "--data", data, "--teacher", tiny_teacher, "--out", tmp_path / "c.pt", "--width", 4,
             "--blocks", 1, "--disc-width", 4, "--steps", 2),
            ("evaluate.py", "--data", data, "--ckpt", tiny_teacher, "--out", tmp_path / "e"),
            ("data/check.py", "--data", data)]
    for run in runs:
        proc = run_main(*run)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "zz_gone.png: a link that points to nothing" in proc.stderr, proc.stderr
        assert "zz_loop.png: a link that loops" in proc.stderr
    (data / "images" / "zz_gone.png").unlink()
    (data / "masks" / "zz_loop.png").unlink()
    (data / "images" / "x.png").mkdir()
    assert_one_line_error(run_main("data/check.py", "--data", data), "x.png: is a folder, not a file")


def test_splits_json_ids_left_out_are_named_and_the_refiners_advice_fits_it(tiny_data, tmp_path):
    data = own_folder(tiny_data, tmp_path / "own", n=10, masked=8)
    (data / "splits.json").write_text(json.dumps(dict(labeled=[f"case_{i:04d}" for i in range(5)],
                                                      val=["case_0005"], test=["case_0006", "case_0007"])))
    checked = run_main("data/check.py", "--data", data)
    assert "left out       2: in no list of splits.json, so used nowhere: case_0008, case_0009" in checked.stdout
    assert "splits.json lists 2 of the 10 images in none of its lists (case_0008, case_0009)" in checked.stderr
    assert "left out" in teacher(data, tmp_path / "teacher.pt").stdout
    proc = run_main("train_cyclegan.py", "--data", data, "--teacher", tmp_path / "teacher.pt", "--out",
                    tmp_path / "c.pt")
    assert_one_line_error(proc, "no unlabelled images", "under \"unlabeled\" in splits.json")
    assert "--labeled-ratio" not in proc.stderr


def test_a_read_only_empty_data_folder_is_named_as_data(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    mkdir = pathlib.Path.mkdir

    def refused(self, *args, **kwargs):       # what a read-only folder does (the suite may run as root)
        if self.is_relative_to(empty):
            raise PermissionError(13, "Permission denied")
        return mkdir(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "mkdir", refused)
    with pytest.raises(Exception, match=f"--data {empty}: cannot write there"):
        prepare_dataset(empty)


def test_evaluate_keeps_mm_and_pixels_apart(tiny_data, tmp_path):
    """A DICOM case (mm from its header) and PNG cases (pixels) in one split."""
    data = own_folder(tiny_data, tmp_path / "own")
    test_id = resolve_split(data, 0, 1.0, 0.2, 0.1)["test"][0]
    png = data / "images" / f"{test_id}.png"
    pixels = iio.imread(png)
    save(dicom(pixels, bits=pixels.dtype.itemsize * 8, PixelSpacing=[0.1, 0.1]), data / "images" / f"{test_id}.dcm")
    png.unlink()
    teacher(data, tmp_path / "teacher.pt")
    assert run_main("evaluate.py", "--ckpt", tmp_path / "teacher.pt", "--no-overlays").returncode == 0   # its --data
    out = tmp_path / "teacher_test_eval"
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert sorted(r["distance_unit"] for r in rows) == ["mm", "px"]
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert "hd95" not in metrics and metrics["hd95 (mm)"]["n"] == metrics["hd95 (px)"]["n"] == 1
    assert metrics["dice"]["n"] == 2                                       # no unit: one mean
    table = (out / "table.md").read_text()
    assert "| hd95 (mm) |" in table and "| hd95 (px) |" in table and "| hd95 |" not in table
    # a split none of whose cases has a mask is said before any case is predicted, and writes nothing
    proc = run_main("evaluate.py", "--ckpt", tmp_path / "teacher.pt", "--split", "unlabeled", "--no-overlays")
    assert_one_line_error(proc, "--split unlabeled: none of its 6 cases has a mask")
    assert "evaluate:" not in proc.stderr and not (tmp_path / "teacher_unlabeled_eval").exists()


def test_a_class_no_mask_holds_is_named_and_left_out_of_means(tiny_data, tmp_path):
    data = own_folder(tiny_data, tmp_path / "own")
    (data / "classes.json").write_text(json.dumps({"255": "sinus", "7": "cyst"}))
    proc = teacher(data, tmp_path / "teacher.pt")
    assert "class 'cyst' is in no mask" in proc.stderr
    evaluate.main([str(a) for a in ("--data", data, "--ckpt", tmp_path / "teacher.pt", "--split", "val",
                                    "--no-overlays")])
    out = tmp_path / "teacher_val_eval"
    row = next(csv.DictReader(open(out / "metrics.csv")))
    assert row["dice"] == row["dice[sinus]"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["classes_in_no_mask"] == ["cyst"]
    assert "cyst (in no mask)" in (out / "table.md").read_text()


def test_validation_dice_leaves_out_a_class_no_mask_holds():
    logits = torch.zeros(2, 3, 8, 8)
    logits[:, 0] = 1                                   # background everywhere
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:5, 2:5] = 1                            # class 1 missed; class 2 in no mask
    assert dice_score(logits, target).item() == 0.0    # not (0 + 1) / 2
    assert dice_score(logits, torch.zeros_like(target)).item() == 1.0


def test_the_student_takes_its_teachers_width_and_flips(tiny_data, tmp_path):
    teacher(tiny_data, tmp_path / "teacher.pt", "--labeled-ratio", 0.3, "--aug-flip", 0)
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", tmp_path / "teacher.pt", "--out",
                    tmp_path / "student.pt", "--method", "kd", "--unlabeled-batch-size", 2, "--steps", 2,
                    "--val-every", 2, "--batch-size", 2, "--ramp-steps", 1)
    assert proc.returncode == 0, proc.stderr
    args = torch.load(tmp_path / "student.pt", weights_only=True)["args"]
    assert args["width"] == 4 and args["aug_flip"] == 0


def test_shared_outputs_name_no_folder_of_this_machine(tiny_data, tiny_teacher, tmp_path):
    out = tmp_path / "site-x" / "student.pt"
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--out", out, "--method",
                    "supervised", "--width", 4, "--steps", 1, "--val-every", 1, "--batch-size", 2)
    assert proc.returncode == 0, proc.stderr
    card = (tmp_path / "site-x" / "student_logs" / "MODEL_CARD.md").read_text()
    assert str(tmp_path) not in card and str(tiny_data) not in card and str(tiny_teacher.parent) not in card
    assert f"`{tiny_data.name}`" in card and f"--data DIR --ckpt student.pt" in card
    images = tmp_path / "site-x" / "scans"
    shutil.copytree(tiny_data / "images", images)
    assert run_main("predict.py", "--ckpt", out, "--images", images, "--out", tmp_path / "p", "--no-overlays",
                    ).returncode == 0
    summary = (tmp_path / "p" / "summary.json").read_text()
    assert str(tmp_path) not in summary and json.loads(summary)["images"] == "scans"


def test_evaluation_and_phantom_generation_show_progress(tiny_data, tiny_teacher, tmp_path, capsys):
    proc = run_main("evaluate.py", "--data", tiny_data, "--ckpt", tiny_teacher, "--out", tmp_path / "e",
                    "--no-overlays")
    assert "evaluate: 100%" in proc.stderr
    generate(tmp_path / "phantom", n=2, size=(32, 64), seed=0)
    assert "phantom: 100%" in capsys.readouterr().err


def test_evaluate_without_data_uses_the_checkpoints_folder_or_says_it_is_gone(tiny_data, tmp_path):
    data = own_folder(tiny_data, tmp_path / "own")
    teacher(data, tmp_path / "teacher.pt")
    moved = tmp_path / "moved"
    os.rename(data, moved)
    proc = run_main("evaluate.py", "--ckpt", tmp_path / "teacher.pt")
    assert_one_line_error(proc, "--data: not given, and the folder --ckpt", "(own) is not found where it was")


def test_curves_are_drawn_at_validations_so_an_interrupted_run_has_them(tmp_path):
    def interrupted(step):          # at the second validation, after the first was drawn
        if step == 1:
            raise KeyboardInterrupt
        return {"dice": 0.5}
    with pytest.raises(KeyboardInterrupt):
        fake_stage(tmp_path / "s.pt", steps=10, val=interrupted)
    assert (tmp_path / "s_logs" / "curves.png").is_file()


def test_overlays_are_readable_at_full_size(tmp_path):
    from engine.overlays import BOTH, PREDICTION, TRUTH, save_overlay
    image = np.full((1400, 2900), 0.5)
    target = np.zeros((1400, 2900), np.uint8)
    target[400:800, 500:900] = target[400:800, 2000:2400] = 1
    pred = np.zeros_like(target)
    pred[420:820, 520:920] = 1
    save_overlay(tmp_path / "o.png", image, pred, ["sinus"], target, "case_7  Dice 0.501", spacing=(0.1, 0.1))
    rgb = iio.imread(tmp_path / "o.png")
    row = rgb[600]                                      # across both regions' left and right edges
    truth = np.all(row == TRUTH, axis=-1)
    assert 3 <= truth[480:540].sum() <= 6                # a line a screen showing the image at half size keeps
    assert np.all(row[600:800] == 127) and np.any(np.all(row == PREDICTION, axis=-1))
    assert not np.any(np.all(rgb == (40, 220, 60), axis=-1)) and TRUTH != (40, 220, 60)   # no red-green pair
    assert np.any(np.all(rgb[:60, :300] == (255, 255, 255), axis=-1))          # the header's text
    assert np.any(np.all(rgb[330:400, 450:950] == PREDICTION, axis=-1))        # the label above the region
    assert BOTH not in (TRUTH, PREDICTION)
