"""The procedural phantom: deterministic, resolution independent, anatomically placed, and hard."""
import json

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import run_main
from scipy import ndimage

from data import phantom
from data.phantom import case_seed, generate, render_case

SIZE = (64, 128)
SEEDS = range(12)


def pixel_centres(n):
    return (np.arange(n) + 0.5) / n


def test_same_seed_same_case_and_different_seeds_differ():
    a_img, a_mask = render_case(7, SIZE)
    b_img, b_mask = render_case(7, SIZE)
    c_img, c_mask = render_case(8, SIZE)
    assert a_img.dtype == np.uint8 and a_mask.dtype == np.uint8 and a_img.shape == a_mask.shape == SIZE
    assert set(np.unique(a_mask)) <= {0, 1}
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_mask, c_mask)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_mask_is_resolution_independent(seed):
    _, small = render_case(seed, (48, 96))
    _, large = render_case(seed, (96, 192))
    # a 2x2 block of the large grid has its centroid at the small pixel's centre: majority vote
    down = large.reshape(48, 2, 96, 2).mean(axis=(1, 3)) >= 0.5
    iou = (down & (small > 0)).sum() / (down | (small > 0)).sum()
    assert iou > 0.9


def test_image_is_resolution_independent_up_to_noise():
    small, _ = render_case(4, (48, 96))
    large, _ = render_case(4, (96, 192))
    down = large.reshape(48, 2, 96, 2).astype(float).mean(axis=(1, 3))
    smooth = [ndimage.gaussian_filter(x.astype(float), 2) for x in (small, down)]
    assert np.corrcoef(smooth[0].ravel(), smooth[1].ravel())[0, 1] > 0.9


def test_two_lobes_in_the_stated_ranges_with_stated_coverage():
    h, w = SIZE
    coverage, extents = [], []
    for seed in SEEDS:
        _, mask = render_case(seed, SIZE)
        labels, n = ndimage.label(mask)
        assert n == 2, f"seed {seed}: {n} components"
        boxes = sorted(ndimage.find_objects(labels), key=lambda b: b[1].start)
        # SPEC: x ~0.20-0.42 and ~0.58-0.80, y ~0.10-0.15 to ~0.35-0.45; single cases may be
        # moved by a positioning error (tilt up to 5 degrees, magnification, shift)
        for side, ((rows, cols), (x_lo, x_hi)) in enumerate(zip(boxes, [(0.14, 0.48), (0.52, 0.86)])):
            xs, ys = pixel_centres(w)[cols], pixel_centres(h)[rows]
            assert x_lo <= xs[0] and xs[-1] <= x_hi, (seed, xs[0], xs[-1])
            assert 0.03 <= ys[0] <= 0.22 and 0.27 <= ys[-1] <= 0.55, (seed, ys[0], ys[-1])
            lateral, medial = (xs[0], xs[-1]) if side == 0 else (1 - xs[-1], 1 - xs[0])
            extents.append((lateral, medial, ys[0], ys[-1]))
        coverage += [(labels == k).mean() for k in (1, 2)]
    lateral, medial, roof, floor = np.mean(extents, axis=0)   # left lobe and mirrored right lobe
    assert 0.17 <= lateral <= 0.25 and 0.38 <= medial <= 0.46
    assert 0.08 <= roof <= 0.17 and 0.32 <= floor <= 0.47
    assert 0.02 <= np.mean(coverage) <= 0.05
    assert 0.01 <= np.min(coverage) and np.max(coverage) <= 0.07


def best_threshold_dice(image, mask):
    """The best Dice any single global threshold reaches, sinus taken as dark or as bright."""
    truth = mask > 0
    best = 0.0
    for t in np.unique(image):
        for pred in (image <= t, image > t):
            best = max(best, 2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    return best


def test_sinus_is_visible_but_not_separable_by_a_threshold():
    darker = []
    for seed in range(8):
        image, mask = render_case(seed, SIZE)
        assert best_threshold_dice(image, mask) < 0.8
        ring = ndimage.binary_dilation(mask, iterations=4) & ~mask.astype(bool)
        darker.append(image[ring].mean() - image[mask > 0].mean())
    # on average the air in the lobes is darker than the bone around them: learnable, not trivial
    assert np.mean(darker) > 0


def test_generate_writes_the_dataset_and_description(tmp_path):
    out = generate(tmp_path / "ph", n=12, size=(32, 64), seed=3, workers=2)
    ids = [f"case_{i:04d}" for i in range(12)]
    assert sorted(p.stem for p in (out / "images").iterdir()) == ids
    assert sorted(p.stem for p in (out / "masks").iterdir()) == ids
    assert not (out / phantom.STAGING).exists()
    info = json.loads((out / "phantom.json").read_text())
    assert (info["n"], info["size"], info["seed"]) == (12, [32, 64], 3)
    image, mask = render_case(case_seed(3, 0), (32, 64))
    np.testing.assert_array_equal(iio.imread(out / "images" / "case_0000.png"), image)
    np.testing.assert_array_equal(iio.imread(out / "masks" / "case_0000.png"), mask * 255)
    sixteen = iio.imread(out / "images" / "case_0009.png")   # every 10th case is 16-bit
    assert sixteen.dtype == np.uint16 and sixteen.max() > 255


def test_interrupted_generation_is_detected_and_redone(tmp_path):
    out = tmp_path / "ph"
    (out / phantom.STAGING / "images").mkdir(parents=True)
    (out / phantom.STAGING / "images" / "case_0000.png").write_bytes(b"half written")
    (out / "masks").mkdir()
    (out / "phantom.json").write_text("{}")
    assert phantom.is_interrupted_phantom(out)
    generate(out, n=3, size=(32, 64), seed=0, workers=1)
    assert len(list((out / "images").iterdir())) == 3 and not phantom.is_interrupted_phantom(out)
    assert json.loads((out / "phantom.json").read_text())["n"] == 3


def run_cli(*args):
    """`python -m data.phantom ARGS`, its main() called in this process."""
    return run_main("data/phantom.py", *args)


def test_cli_writes_the_same_dataset_as_generate(tmp_path):
    res = run_cli("--out", str(tmp_path / "cli"), "--n", "3", "--size", "32", "64", "--seed", "5")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 1 and "3 phantom cases" in res.stdout
    generate(tmp_path / "api", n=3, size=(32, 64), seed=5, workers=1)
    for name in ("images", "masks"):
        for i in range(3):
            f = f"{name}/case_{i:04d}.png"
            np.testing.assert_array_equal(iio.imread(tmp_path / "cli" / f), iio.imread(tmp_path / "api" / f))


def test_cli_help_and_one_line_errors(tmp_path):
    res = run_cli("--help")
    assert res.returncode == 0
    assert all(flag in res.stdout for flag in ("--out", "--n", "--size", "--seed", "--grid"))
    for bad in (["--out", str(tmp_path), "--n", "x"], ["--out", str(tmp_path), "--n", "0"],
                ["--out", str(tmp_path), "--size", "8", "8"], ["--n", "3"]):
        res = run_cli(*bad)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    generate(tmp_path / "full", n=1, size=(32, 64), seed=0, workers=1)
    res = run_cli("--out", str(tmp_path / "full"), "--n", "1")
    assert res.returncode == 2 and "--out" in res.stderr and len(res.stderr.strip().splitlines()) == 1
