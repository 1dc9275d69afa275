"""predict.py: masks at each image's own size and bit depth, overlays, probability maps and areas
for a folder of images without masks; bad input is one line and leaves nothing behind."""
import csv
import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import run_script

import predict

# imageio reads TIFF through its vendored tifffile, which warns about its own future removal
pytestmark = pytest.mark.filterwarnings("ignore:ImageIO's vendored tifffile:DeprecationWarning")


@pytest.fixture
def images(tiny_data, tmp_path):
    """Unlabelled radiographs: phantom cases (one of them 16-bit), an RGB PNG and a 16-bit TIFF of
    other sizes."""
    folder = tmp_path / "new"
    folder.mkdir()
    for case_id in ("case_0000", "case_0009", "case_0012"):
        shutil.copy(tiny_data / "images" / f"{case_id}.png", folder)
    phantom = iio.imread(tiny_data / "images" / "case_0001.png")
    iio.imwrite(folder / "rgb.png", np.repeat(phantom[5:55, 10:100, None], 3, axis=2))
    iio.imwrite(folder / "deep.tif", (phantom[:40, :100].astype(np.uint16) * 257))
    return folder


def test_predict_writes_masks_overlays_probabilities_and_areas(tiny_teacher, images, tmp_path):
    out = tmp_path / "out"
    proc = run_script("predict.py", "--ckpt", tiny_teacher, "--images", images, "--out", out, "--probabilities",
                      "--spacing", "0.1", "0.2", "--batch-size", "2")
    assert "5 images segmented" in proc.stdout
    rows = {r["id"]: r for r in csv.DictReader(open(out / "areas.csv"))}
    assert sorted(rows) == ["case_0000", "case_0009", "case_0012", "deep", "rgb"]
    for path in images.iterdir():
        shape = iio.imread(path).shape[:2]
        mask = iio.imread(out / "masks" / f"{path.stem}.png")
        assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        row = rows[path.stem]
        assert (int(row["height"]), int(row["width"])) == shape
        assert float(row["area_mm2[sinus]"]) == pytest.approx((mask == 255).sum() * 0.02)
        probability = iio.imread(out / "probabilities" / f"{path.stem}_255.png")
        assert probability.shape == shape
        assert np.mean((mask == 255) == (probability >= 128)) > 0.999     # the mask is the argmax
        assert iio.imread(out / "overlays" / f"{path.stem}.png").shape == shape + (3,)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 5 and summary["kind"] == "teacher" and summary["classes"]["values"] == [255]
    assert not out.with_name("out.tmp").exists()


def run_predict(capsys, *argv):
    """predict.main in this process -> the one line it printed on stderr (it must fail)."""
    with pytest.raises(SystemExit) as stop:
        predict.main([str(a) for a in argv])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and len([x for x in lines if x.startswith("error")]) == 1
    return lines[-1]


def test_bad_input_is_one_line_and_leaves_nothing_behind(tiny_teacher, images, tmp_path, capsys):
    out = tmp_path / "out"
    (images / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)    # read last
    assert "zz_broken.png: cannot decode" in run_predict(capsys, "--ckpt", tiny_teacher, "--images", images,
                                                          "--out", out, "--batch-size", 1)
    assert not out.exists() and not out.with_name("out.tmp").exists()

    (images / "zz_broken.png").unlink()
    (images / "notes.txt").write_text("x")
    assert "notes.txt: not a supported image type" in run_predict(capsys, "--ckpt", tiny_teacher, "--images",
                                                                   images, "--out", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in run_predict(capsys, "--ckpt", tiny_teacher, "--images", empty, "--out", out)
    assert "inside --images" in run_predict(capsys, "--ckpt", tiny_teacher, "--images", images,
                                            "--out", images / "masks")
    refiner = tmp_path / "cyclegan.pt"
    torch.save(dict(torch.load(tiny_teacher, weights_only=True), kind="cyclegan"), refiner)
    assert "is a cyclegan checkpoint, expected a teacher or student" in run_predict(
        capsys, "--ckpt", refiner, "--images", images, "--out", out)
    assert not out.exists()
