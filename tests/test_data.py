"""The data package: decoding and preprocessing, splits, tensors, batches and augmentation."""
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import data.phantom
from data import Dataset, Geometry, Photometric, augment_geometry, augment_photometric, batch_indices, \
    load_tensors, prepare_dataset, resolve_split, step_generator, strengths
from data.dataset import preprocess
from train_teacher import TeacherSettings

GEOMETRY = strengths(Geometry, TeacherSettings(), "aug_")          # the stages' defaults
PHOTOMETRIC = strengths(Photometric, TeacherSettings(), "aug_")

# imageio reads TIFF through its vendored tifffile, which warns about its own future removal
pytestmark = pytest.mark.filterwarnings("ignore:ImageIO's vendored tifffile:DeprecationWarning")

RNG = np.random.default_rng(0)


def write_case(root, case_id, image, mask=None, suffix=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    iio.imwrite(root / "images" / f"{case_id}{suffix}", image)
    if mask is not None:
        (root / "masks").mkdir(exist_ok=True)
        iio.imwrite(root / "masks" / f"{case_id}.png", mask)


def expected(gray):
    """Preprocessing written out from its definition: 1st/99th percentile clip, scaled to [0, 1]."""
    lo, hi = np.percentile(gray.astype(float), [1, 99])
    return np.clip((gray - lo) / (hi - lo), 0, 1)


def test_reading_a_case_gray_8_bit_with_percentile_normalisation(tmp_path):
    gray = RNG.integers(0, 256, (13, 21), dtype=np.uint8)
    mask = np.zeros((13, 21), np.uint8)
    mask[3:7, 4:9] = 255
    write_case(tmp_path, "a", gray, mask)
    image, m = Dataset.open(tmp_path).read("a")
    assert image.dtype == np.float32 and image.shape == (13, 21)
    np.testing.assert_allclose(image, expected(gray), atol=1e-6)
    assert image.min() == 0 and image.max() == 1
    assert m.dtype == np.uint8 and m.sum() == 20 and (m[3:7, 4:9] == 1).all()   # class indices: 1 = sinus


def test_reading_a_case_rgb_and_rgba_use_luminance_and_ignore_alpha(tmp_path):
    rgb = RNG.integers(0, 256, (11, 17, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (11, 17, 1), dtype=np.uint8)
    write_case(tmp_path, "rgb", rgb)
    write_case(tmp_path, "rgba", np.concatenate([rgb, alpha], axis=2))
    luminance = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    for case_id in ("rgb", "rgba"):
        image, mask = Dataset.open(tmp_path).read(case_id)
        assert mask is None and image.shape == (11, 17)
        np.testing.assert_allclose(image, expected(luminance), atol=1e-5)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
def test_reading_a_case_keeps_16_bit_precision(tmp_path, suffix):
    # values spaced by less than 256: truncating to 8 bits would merge neighbours
    ramp = (np.arange(15 * 23).reshape(15, 23) * 37 + 1000).astype(np.uint16)
    write_case(tmp_path, "deep", ramp, suffix=suffix)
    image, _ = Dataset.open(tmp_path).read("deep")
    np.testing.assert_allclose(image, expected(ramp), atol=1e-6)
    assert len(np.unique(image)) > 300


def test_reading_a_case_jpeg(tmp_path):
    smooth = np.add.outer(np.arange(32), np.arange(48)).astype(np.uint8) * 3
    write_case(tmp_path, "j", smooth, suffix=".jpg")
    image, _ = Dataset.open(tmp_path).read("j")
    assert image.shape == (32, 48) and 0 <= image.min() and image.max() <= 1
    assert np.corrcoef(image.ravel(), expected(smooth).ravel())[0, 1] > 0.99


def test_preprocess_constant_image_does_not_divide_by_zero():
    out = preprocess(np.full((5, 7), 42, np.uint8))
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def make_split_dataset(root, n_masked=30, n_unmasked=5):
    tiny = np.zeros((4, 6), np.uint8)
    for i in range(n_masked):
        write_case(root, f"m{i:02d}", tiny, tiny)
    for i in range(n_unmasked):
        write_case(root, f"u{i:02d}", tiny)
    return root


def test_split_fractions_and_partition(tmp_path):
    root = make_split_dataset(tmp_path)
    split = resolve_split(root, 0, 0.1, 0.2, 0.1)
    masked = {f"m{i:02d}" for i in range(30)}
    # 30 masked: 6 test, 3 val, 21 train of which round(2.1) = 2 labelled
    assert [len(split[k]) for k in ("test", "val", "labeled")] == [6, 3, 2]
    assert set(split["labeled"] + split["val"] + split["test"]) <= masked
    assert {f"u{i:02d}" for i in range(5)} <= set(split["unlabeled"])
    everything = [i for k in ("labeled", "unlabeled", "val", "test") for i in split[k]]
    assert sorted(everything) == sorted(masked | {f"u{i:02d}" for i in range(5)})   # a partition
    assert all(split[k] == sorted(split[k]) for k in split)


def test_split_is_deterministic_and_independent_of_listing_order(tmp_path, monkeypatch):
    root = make_split_dataset(tmp_path)
    a = resolve_split(root, 1, 0.2, 0.2, 0.1)
    assert resolve_split(root, 1, 0.2, 0.2, 0.1) == a
    assert resolve_split(root, 2, 0.2, 0.2, 0.1) != a
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(list(listing(self))[::-1]))
    assert resolve_split(root, 1, 0.2, 0.2, 0.1) == a


def test_labeled_ratio_one_labels_every_training_id(tmp_path):
    root = make_split_dataset(tmp_path)
    split = resolve_split(root, 0, 1.0, 0.2, 0.1)
    assert len(split["labeled"]) == 21
    assert split["unlabeled"] == [f"u{i:02d}" for i in range(5)]


def test_splits_json_is_honoured(tmp_path):
    root = make_split_dataset(tmp_path, n_masked=6, n_unmasked=2)
    fixed = {"labeled": ["m03"], "unlabeled": ["u01", "m00", "u00"], "val": ["m05", "m01"], "test": ["m02"]}
    (root / "splits.json").write_text(json.dumps(fixed))
    split = resolve_split(root, 0, 0.5, 0.2, 0.1)
    assert split == {k: sorted(v) for k, v in fixed.items()}


def test_prepare_dataset_generates_the_phantom_in_an_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data.phantom, "DEFAULT", dict(n=8, size=(32, 64), seed=0))
    (tmp_path / "empty").mkdir()
    root = prepare_dataset(tmp_path / "empty")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "phantom" in out[0] and str(root) in out[0]
    assert len(list((root / "images").iterdir())) == 8
    assert prepare_dataset(root) == root and capsys.readouterr().out == ""   # second call reuses it
    split = resolve_split(root, 0, 0.1, 0.2, 0.1)
    image, mask = Dataset.open(root).read(split["test"][0])
    assert image.shape == mask.shape == (32, 64) and mask.any()


def test_load_tensors_shapes_dtypes_and_resizing(tmp_path):
    image = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (20, 1))
    half = np.zeros((20, 40), np.uint8)
    half[:, :20] = 1
    for i in range(3):
        write_case(tmp_path, f"c{i}", image, half)
    x, y = load_tensors(tmp_path, ["c0", "c2", "c1"], size=(10, 20))
    assert x.shape == (3, 1, 10, 20) and x.dtype == torch.float32
    assert y.shape == (3, 10, 20) and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    assert (x[:, :, :, 1:] >= x[:, :, :, :-1]).all()            # the ramp stays a ramp
    assert (y[:, :, :10] == 1).all() and (y[:, :, 10:] == 0).all()  # nearest keeps the half exactly
    x2, none = load_tensors(tmp_path, ["c1"], size=(7, 9), with_masks=False)
    assert x2.shape == (1, 1, 7, 9) and none is None


def test_batch_indices_are_pure_and_cover_each_epoch():
    n, bs, seed = 7, 3, 11
    steps = [batch_indices(n, bs, seed, s) for s in range(14)]
    assert all(b.dtype == torch.long and b.shape == (bs,) for b in steps)
    assert torch.equal(batch_indices(n, bs, seed, 9), steps[9])       # any order, same answer
    stream = torch.cat(steps)
    for epoch in range(6):
        assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n:2 * n])               # a fresh permutation per epoch
    other_seed = torch.cat([batch_indices(n, bs, seed + 1, s) for s in range(14)])
    assert not torch.equal(other_seed, stream)


def test_step_generator_depends_on_seed_step_and_stream():
    draw = lambda *a: torch.rand(4, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 5, "labeled"), draw(0, 5, "labeled"))
    assert not torch.equal(draw(0, 5, "labeled"), draw(0, 5, "unlabeled"))
    assert not torch.equal(draw(0, 5, "labeled"), draw(0, 6, "labeled"))
    assert not torch.equal(draw(0, 5, "labeled"), draw(1, 5, "labeled"))


def blob_batch(n=6, h=37, w=61):
    """Binary images of off-centre ellipses (so a flip or a shift is visible) and their masks."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = torch.stack([(((xx - 18 - 3 * i) / 11.0) ** 2 + ((yy - 14 - i) / 7.0) ** 2 < 1).long()
                         for i in range(n)])
    return masks[:, None].float(), masks


def test_augment_geometry_keeps_image_and_mask_aligned():
    images, masks = blob_batch()
    flips = 0
    for seed in range(4):
        out_img, out_mask = augment_geometry(images, masks, step_generator(seed, 0, "labeled"), GEOMETRY)
        assert out_img.shape == images.shape and out_mask.shape == masks.shape
        assert out_mask.dtype == torch.int64 and set(out_mask.unique().tolist()) <= {0, 1}
        # wherever the bilinear image is exactly 0 or 1 (all four neighbours agree) the nearest
        # mask must say the same; only the one-pixel interpolation band may differ
        solid = (out_img[:, 0] == 0) | (out_img[:, 0] == 1)
        assert torch.equal(out_mask[solid], out_img[:, 0][solid].long())
        assert (out_mask == (out_img[:, 0] > 0.5).long()).float().mean() > 0.99
        assert not torch.equal(out_mask, masks)
        flips += int(((out_mask[:, :, :30].sum((1, 2)) < out_mask[:, :, 31:].sum((1, 2)))).sum())
    assert flips > 0   # the blobs start on the left; some ended on the right


def test_augment_geometry_is_reproducible_and_accepts_no_masks():
    images, masks = blob_batch()
    a, am = augment_geometry(images, masks, step_generator(3, 2, "u"), GEOMETRY)
    b, none = augment_geometry(images, None, step_generator(3, 2, "u"), GEOMETRY)
    assert none is None and torch.equal(a, b)


def test_augment_photometric_stays_in_range_and_leaves_inputs_alone():
    images = torch.rand(5, 1, 19, 33)
    before = images.clone()
    out = augment_photometric(images, step_generator(0, 1, "labeled"), PHOTOMETRIC)
    again = augment_photometric(images, step_generator(0, 1, "labeled"), PHOTOMETRIC)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, again) and torch.equal(images, before)
    assert not torch.allclose(out, images, atol=1e-3)
