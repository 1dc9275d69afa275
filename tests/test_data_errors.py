"""Every bad-data case of SPEC section 9 is a one-line UserError naming the file or flag."""
import json

import imageio.v3 as iio
import numpy as np
import pytest

from data import Dataset, load_tensors, prepare_dataset, resolve_split
from engine.cli import parse
from errors import UserError
from train_teacher import TeacherSettings

# imageio reads TIFF through its vendored tifffile, which warns about its own future removal
pytestmark = pytest.mark.filterwarnings("ignore:ImageIO's vendored tifffile:DeprecationWarning")


def write_case(root, case_id, image=None, mask=None, suffix=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    image = np.zeros((8, 12), np.uint8) if image is None else image
    iio.imwrite(root / "images" / f"{case_id}{suffix}", image)
    if mask is not None:
        (root / "masks").mkdir(exist_ok=True)
        iio.imwrite(root / "masks" / f"{case_id}.png", mask)


def raises(fn, *args, must_name, **kwargs):
    """Run fn, expect a UserError on one line that contains every string in must_name."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for part in must_name:
        assert str(part) in message, message
    return message


def masked_dataset(root, n=10):
    for i in range(n):
        write_case(root, f"c{i}", mask=np.zeros((8, 12), np.uint8))
    return root


def test_missing_data_folder(tmp_path):
    raises(prepare_dataset, tmp_path / "nowhere", must_name=["--data", tmp_path / "nowhere"])


def test_data_is_a_file_or_a_folder_without_images(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    raises(prepare_dataset, tmp_path / "file.txt", must_name=["--data", "file.txt"])
    raises(prepare_dataset, tmp_path, must_name=["--data", "images/"])   # not empty: no phantom here


def test_empty_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    raises(Dataset.open, tmp_path, must_name=["--data", tmp_path, "empty"])


def test_corrupt_image(tmp_path):
    masked_dataset(tmp_path, 2)
    (tmp_path / "images" / "c1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    raises(lambda root, case: Dataset.open(root).read(case), tmp_path, "c1", must_name=["c1.png", "cannot decode"])
    raises(load_tensors, tmp_path, ["c0", "c1"], (4, 6), must_name=["c1.png"])


def test_unsupported_extension_and_undecodable_content(tmp_path):
    masked_dataset(tmp_path, 2)
    (tmp_path / "images" / "scan.bmp").write_bytes(b"BM")
    raises(Dataset.open, tmp_path, must_name=["scan.bmp", ".png"])
    (tmp_path / "images" / "scan.bmp").unlink()
    (tmp_path / "images" / "text.tif").write_text("this is not a TIFF")
    raises(lambda root, case: Dataset.open(root).read(case), tmp_path, "text", must_name=["text.tif"])


def test_mask_size_differs_from_image(tmp_path):
    write_case(tmp_path, "a", image=np.zeros((8, 12), np.uint8), mask=np.zeros((10, 12), np.uint8))
    raises(lambda root, case: Dataset.open(root).read(case), tmp_path, "a", must_name=["a.png", "10x12", "8x12"])


def test_mask_values_not_binary(tmp_path):
    mask = np.zeros((8, 12), np.uint8)
    mask[1, 1], mask[2, 2] = 100, 255
    write_case(tmp_path, "a", mask=mask)
    raises(lambda root, case: Dataset.open(root).read(case), tmp_path, "a", must_name=["masks", "a.png", "0, 100, 255"])


def test_splits_json_with_unknown_ids(tmp_path):
    masked_dataset(tmp_path)
    (tmp_path / "splits.json").write_text(json.dumps(
        {"labeled": ["c0", "ghost"], "unlabeled": [], "val": ["c1"], "test": ["c2"]}))
    raises(resolve_split, tmp_path, 0, 0.1, 0.2, 0.1, must_name=["splits.json", "ghost"])


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_splits_json_with_val_or_test_overlapping_training(tmp_path, held_out):
    masked_dataset(tmp_path)
    split = {"labeled": ["c0", "c3"], "unlabeled": ["c4"], "val": ["c1"], "test": ["c2"]}
    split[held_out].append("c3")
    (tmp_path / "splits.json").write_text(json.dumps(split))
    raises(resolve_split, tmp_path, 0, 0.1, 0.2, 0.1, must_name=["splits.json", "c3", held_out])


def test_splits_json_labelled_without_mask_or_unreadable(tmp_path):
    masked_dataset(tmp_path)
    write_case(tmp_path, "nomask")
    (tmp_path / "splits.json").write_text(json.dumps(
        {"labeled": ["nomask"], "unlabeled": [], "val": ["c1"], "test": ["c2"]}))
    raises(resolve_split, tmp_path, 0, 0.1, 0.2, 0.1, must_name=["splits.json", "nomask"])
    (tmp_path / "splits.json").write_text("{not json")
    raises(resolve_split, tmp_path, 0, 0.1, 0.2, 0.1, must_name=["splits.json"])


def test_too_few_labelled_images(tmp_path):
    masked_dataset(tmp_path, 3)
    raises(resolve_split, tmp_path, 0, 0.1, 0.2, 0.1, must_name=["--data", "3 masked"])


def test_a_fraction_that_leaves_a_part_empty_is_named_with_the_sizes(tmp_path):
    masked_dataset(tmp_path, 10)
    raises(resolve_split, tmp_path, 0, 0.1, 0.2, 0.04, must_name=["8 train, 0 val and 2 test", "--val-fraction 0.04"])
    raises(resolve_split, tmp_path, 0, 0.5, 0.6, 0.6, must_name=["0 train, 4 val and 6 test"])


def test_labeled_ratio_out_of_range():
    for ratio in ("0", "1.5", "nan"):
        raises(parse, TeacherSettings, "", ["--labeled-ratio", ratio], must_name=[f"--labeled-ratio {float(ratio)}",
                                                                              "(0, 1]"])


def test_mask_without_image_and_non_png_mask(tmp_path):
    masked_dataset(tmp_path, 2)
    iio.imwrite(tmp_path / "masks" / "orphan.png", np.zeros((8, 12), np.uint8))
    raises(Dataset.open, tmp_path, must_name=["orphan.png"])
    (tmp_path / "masks" / "orphan.png").unlink()
    iio.imwrite(tmp_path / "masks" / "c0.jpg", np.zeros((8, 12), np.uint8))
    raises(Dataset.open, tmp_path, must_name=["c0.jpg", "PNG"])


def test_two_images_with_one_id(tmp_path):
    write_case(tmp_path, "a")
    write_case(tmp_path, "a", suffix=".tif")
    raises(Dataset.open, tmp_path, must_name=["a.png", "a.tif"])


def test_bad_size_and_unknown_ids_for_tensors(tmp_path):
    masked_dataset(tmp_path, 2)
    raises(load_tensors, tmp_path, ["c0"], (0, 8), must_name=["--size"])
    raises(load_tensors, tmp_path, ["c0", "zz"], (4, 6), must_name=["zz"])
