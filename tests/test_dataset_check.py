"""The dataset check: the teacher refuses a dataset with a bad file anywhere in its split before it
writes anything, naming every bad file; `python -m data.check` says the same or summarises the
dataset; later stages trust an unchanged folder's fingerprint and check a changed one again."""
import os
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import TINY, run_main

import data.check
import evaluate
from data.check import check_folder, fingerprint, upstream_dataset
from data.classes import binary
from errors import UserError


@pytest.fixture
def broken_data(tiny_data, tmp_path):
    """A copy of the tiny phantom with four bad files (bad image, mask size, mask values, orphan mask);
    -> (folder, the names that must be reported)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "images" / "case_0000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    iio.imwrite(root / "masks" / "case_0007.png", np.zeros((10, 12), np.uint8))
    values = iio.imread(root / "masks" / "case_0021.png")
    values[0, :3] = (7, 9, 11)
    iio.imwrite(root / "masks" / "case_0021.png", values)
    (root / "images" / "case_0029.png").unlink()           # its mask is left without an image
    return root, ["case_0000.png", "case_0007.png", "10x12", "case_0021.png", "7, 9, 11", "case_0029.png"]


def test_the_teacher_refuses_a_bad_dataset_before_writing_anything(broken_data, tmp_path):
    root, named = broken_data
    out = tmp_path / "run" / "teacher.pt"
    proc = run_main("train_teacher.py", "--data", root, "--out", out, "--steps", 2, "--width", 4, *TINY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    report = proc.stderr.strip().splitlines()
    assert report[0] == f"error: --data {root}: 4 problems; fix them and run again:" and len(report) == 5
    for name in named:
        assert name in proc.stderr
    assert list(out.parent.iterdir()) == []                 # no checkpoint, no logs


def test_the_first_20_problems_are_listed_and_the_rest_counted(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(25):
        (tmp_path / "images" / f"bad{i:02d}.png").write_bytes(b"not a png")
    with pytest.raises(UserError) as info:
        check_folder(tmp_path, binary())
    lines = str(info.value).splitlines()
    assert lines[0].endswith("25 problems; fix them and run again:")
    assert len(lines) == 1 + 20 + 1 and lines[-1].strip() == "... and 5 more"
    assert all("cannot decode this image" in line for line in lines[1:21])


def test_data_check_command_summarises_a_good_dataset(tiny_data, capsys):
    data.check.main(["--data", str(tiny_data)])
    summary = capsys.readouterr().out.strip()
    # the tiny phantom: 30 cases at 64x128, every 10th one 16-bit
    for part in ("30 cases, 30 with a mask", "binary", "mask values: 255", "sizes: 64x128 (30)",
                 "bits: 8 (27), 16 (3)", "no problems"):
        assert part in summary, summary


def check_problems(capsys, root) -> str:
    """data.check's report on `root` (it must find a problem)."""
    with pytest.raises(SystemExit) as stop:
        data.check.main(["--data", str(root)])
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_data_check_command_lists_every_problem(broken_data, capsys):
    root, named = broken_data
    report = check_problems(capsys, root)
    assert report.startswith(f"error: --data {root}: 4 problems")
    for name in named:
        assert name in report


def test_later_stages_trust_an_unchanged_folder_and_check_a_changed_one(tiny_data, tiny_teacher, tmp_path,
                                                                        monkeypatch, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)                     # copies keep names, sizes and times
    ckpt = torch.load(tiny_teacher, weights_only=True)
    assert ckpt["data_fingerprint"] == fingerprint(tiny_data) == fingerprint(root)
    checked = []
    monkeypatch.setattr(data.check, "check_folder", lambda root, classes, split: checked.append(split))
    upstream_dataset(root, ckpt, "--teacher", tiny_teacher)
    assert checked == []
    os.utime(root / "images" / "case_0003.png", ns=(0, 0))
    upstream_dataset(root, ckpt, "--teacher", tiny_teacher)
    assert checked == [ckpt["split"]]

    # a file spoiled after the teacher trained is found by the next stage, wherever it is in the split
    monkeypatch.undo()
    unlabeled = ckpt["split"]["unlabeled"][0]
    (root / "images" / f"{unlabeled}.png").write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(root), "--ckpt", str(tiny_teacher), "--out", str(tmp_path / "e")])
    assert f"{unlabeled}.png: cannot decode" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_the_check_validates_splits_json_too(tiny_data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "splits.json").write_text('{"labeled": ["case_0000", "ghost"], "val": ["case_0001"], "test": ["x"]}')
    (root / "images" / "case_0005.png").write_bytes(b"garbage")
    report = check_problems(capsys, root)
    assert "2 problems" in report and "splits.json: unknown ids" in report and "ghost" in report
    assert "case_0005.png" in report


def test_a_split_id_whose_image_and_mask_are_gone_is_listed_once(tiny_data, tiny_teacher, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    split = torch.load(tiny_teacher, weights_only=True)["split"]
    gone = split["labeled"][0]
    (root / "images" / f"{gone}.png").unlink()
    (root / "masks" / f"{gone}.png").unlink()
    with pytest.raises(UserError) as info:
        check_folder(root, binary(), split)
    assert f"the split's ids {gone} have no image or mask" in str(info.value)
