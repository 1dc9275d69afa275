"""Pixels that are not a radiograph: NaN or infinite values are an error naming the file wherever
images are read (the data check, the stages' loading, evaluate.py, predict.py), before anything
is written; a constant image (a blank exposure) is a warning naming it."""
import shutil

import imageio.v3 as iio
import numpy as np
import pytest

import data.check
import evaluate
import predict
from data import Dataset
from data.check import check_folder
from data.classes import binary
from errors import UserError

# imageio reads TIFF through its vendored tifffile, which warns about its own future removal
pytestmark = pytest.mark.filterwarnings("ignore:ImageIO's vendored tifffile:DeprecationWarning")


def holed(path, value=np.nan):
    """The image at `path` as a float32 TIFF with a 5x5 patch of `value`, as a failed flat-field
    correction leaves; returns the TIFF's path (the same case id)."""
    image = iio.imread(path).astype(np.float32)
    image[10:15, 20:25] = value
    tif = path.with_suffix(".tif")
    path.unlink()
    iio.imwrite(tif, image)
    return tif


@pytest.fixture
def nan_data(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root, holed(root / "images" / "case_0004.png"), holed(root / "images" / "case_0011.png", np.inf)


def refused(main, argv, capsys) -> str:
    """What main(argv) printed when it stopped on a user error (one error, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    return err


def test_the_check_and_the_stages_loading_refuse_nan_and_inf_by_name(nan_data):
    root, nan, inf = nan_data
    with pytest.raises(UserError) as info:
        check_folder(root, binary())
    lines = str(info.value).splitlines()
    assert lines[0].endswith("2 problems; fix them and run again:")
    assert f"{nan}: 25 of its 8192 pixels are NaN or infinite" in lines[1]
    assert f"{inf}: 25 of its 8192 pixels are NaN or infinite" in lines[2]
    dataset = Dataset.open(root)
    with pytest.raises(UserError, match="case_0004.tif: 25 of its"):
        dataset.tensors(["case_0003", "case_0004"], (32, 64), with_masks=False)


def test_evaluate_and_predict_refuse_nan_by_name_and_write_nothing(nan_data, tiny_teacher, tmp_path, capsys):
    root, nan, _ = nan_data
    out = tmp_path / "eval"
    # the folder changed since the teacher checked it, so evaluate.py checks the split again
    err = refused(evaluate.main, ["--data", root, "--ckpt", tiny_teacher, "--out", out], capsys)
    assert "2 problems" in err and "case_0004.tif: 25 of its" in err and "case_0011.tif: 25 of its" in err
    assert not out.exists() and not out.with_name("eval.tmp").exists()

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(root / "images" / "case_0003.png", scans)
    shutil.copy(nan, scans)
    out = tmp_path / "pred"
    err = refused(predict.main, ["--ckpt", tiny_teacher, "--images", scans, "--out", out], capsys)
    assert err.strip().splitlines()[-1].startswith(f"error: {scans / nan.name}: 25 of its 8192 pixels are NaN or infinite")
    assert not out.exists() and not out.with_name("pred.tmp").exists()


def test_a_constant_image_is_a_warning_naming_it(tiny_data, tiny_teacher, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    blank = root / "images" / "case_0002.png"
    iio.imwrite(blank, np.full((64, 128), 17, np.uint8))
    data.check.main(["--data", str(root)])
    captured = capsys.readouterr()
    assert "no problems" in captured.out
    assert captured.err.strip() == f"warning: {blank}: every pixel is 17, a blank image; it teaches and shows nothing"

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(blank, scans)
    predict.main([str(a) for a in ("--ckpt", tiny_teacher, "--images", scans, "--out", tmp_path / "pred")])
    assert f"warning: {scans / blank.name}: every pixel is 17" in capsys.readouterr().err
    assert (tmp_path / "pred" / "masks" / "case_0002.png").is_file()
