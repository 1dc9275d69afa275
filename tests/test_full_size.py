"""Full-size clinical panoramas: 2943x1435 cases as 8-bit PNG and 16-bit TIFF go through the
teacher, a student, evaluate.py and predict.py at a small network size, scored and segmented at
their original size; the evaluation decodes each file once and lists the dataset's folders once."""
import csv
import json
import shutil
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import REPO, SCRIPT_ENV, TINY, run_scripts

import predict
from data.synthetic import panorama, write_case

H, W = 1435, 2943
SPLIT = dict(labeled=["c0", "c1"], unlabeled=["c2"], val=["c3"], test=["c4", "c5"])

# imageio writes and reads TIFF through its vendored tifffile, which warns about its own removal
pytestmark = pytest.mark.filterwarnings("ignore:ImageIO's vendored tifffile:DeprecationWarning")


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    """Six full-size cases, even ones 8-bit PNG, odd ones 16-bit TIFF, with a fixed split."""
    root = tmp_path_factory.mktemp("clinic")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        write_case(root, f"c{i}", *panorama(rng, (H, W)), sixteen_bit=i % 2 == 1)
    (root / "splits.json").write_text(json.dumps(SPLIT))
    return root


# evaluate.py as a user runs it, counting every file it decodes and every folder it lists
COUNTED_EVALUATE = """
import collections, json, sys
import data.dataset as dataset
decoded, listed = collections.Counter(), []
decode, listing = dataset.decode, dataset._listing
dataset.decode = lambda path, *why: decoded.update([path.name]) or decode(path, *why)
dataset._listing = lambda folder: listed.append(folder.name) or listing(folder)
import evaluate
evaluate.main(sys.argv[1:])
print(json.dumps(dict(decoded=decoded, listed=listed)))
"""


def test_full_size_panoramas_train_evaluate_and_predict_at_their_own_size(clinic, tmp_path):
    common = ["--data", clinic, "--width", 4, "--steps", 2, "--val-every", 2, "--batch-size", 2]
    run_scripts(("train_teacher.py", *common, "--out", tmp_path / "teacher.pt", *TINY),
                ("train_student.py", *common, "--teacher", tmp_path / "teacher.pt", "--method", "kd",
                 "--unlabeled-batch-size", 1, "--out", tmp_path / "student.pt"))

    proc = subprocess.run([sys.executable, "-c", COUNTED_EVALUATE, "--data", str(clinic), "--ckpt",
                           str(tmp_path / "student.pt"), "--out", str(tmp_path / "eval"), "--spacing", "0.1"],
                          cwd=REPO, env=SCRIPT_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["decoded"] == {"c4.png": 2, "c5.tif": 1, "c5.png": 1}    # c4's image and mask share a name
    assert counts["listed"] == ["images", "masks"]
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert [r["id"] for r in rows] == SPLIT["test"]
    assert all((int(r["height"]), int(r["width"])) == (H, W) for r in rows)
    assert all(0 <= float(r["dice"]) <= 1 for r in rows)
    assert len(list((tmp_path / "eval" / "overlays").iterdir())) == 2

    new = tmp_path / "new"                   # the test cases again, as images without masks
    new.mkdir()
    for name in ("c4.png", "c5.tif"):
        shutil.copy(clinic / "images" / name, new)
    predict.main([str(a) for a in ("--ckpt", tmp_path / "student.pt", "--images", new, "--out", tmp_path / "pred",
                                   "--no-overlays")])
    for case_id in SPLIT["test"]:
        assert iio.imread(tmp_path / "pred" / "masks" / f"{case_id}.png").shape == (H, W)
