"""Boundary metrics (HD, HD95, ASSD): the CPU path against MedPy, MONAI and a brute-force
computation from the definitions of SPEC section 7, and where DeepMind's surface-distance agrees
with it; the Triton path (interpreter) against the CPU path; argument checking.

Conventions bridged: MedPy's hd95 is the pooled percentile, so it checks `hd95_pooled`; MONAI's
percentile Hausdorff distance is the larger directed one, so it checks `hd95`. Both take the
boundary as `M XOR erode(M)` with the 4-neighbour cross and treat pixels outside the image as
background (MedPy through scipy's erosion, whose border value is 0; MONAI by padding its crop
with zeros), so masks touching the border compare as they are. Neither defines empty masks (MedPy
raises, MONAI gives inf/NaN), so those cases are checked against the brute force only.
"""
import numpy as np
import pytest
import torch
from scipy import ndimage

from kernels import boundary, boundary_metrics, boundary_triton

SHAPE = (29, 43)
SPACING = (0.5, 1.3)
TOL = 1e-3


def _blob(rng, shape=SHAPE, sigma=3.0, fraction=0.3):
    """Random smooth shapes covering about `fraction` of the image, often in several pieces."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1 - fraction)


def _pixel(y, x, shape=SHAPE):
    mask = np.zeros(shape, dtype=bool)
    mask[y, x] = True
    return mask


def _cases():
    """Named (pred, target) pairs of one odd shape, covering the cases the metric has to get right."""
    rng = np.random.default_rng(7)
    empty, full = np.zeros(SHAPE, dtype=bool), np.ones(SHAPE, dtype=bool)
    blob = _blob(rng)
    shifted = np.roll(blob, (2, -3), axis=(0, 1)) | _pixel(1, 40)
    return {
        "blobs": (blob, _blob(rng)),
        "perturbed": (blob, shifted),
        "touching_border": (_blob(rng, fraction=0.7), _blob(rng, fraction=0.6)),
        "full_image": (full, _blob(rng)),
        "speckle": (rng.random(SHAPE) < 0.4, rng.random(SHAPE) < 0.4),
        "single_pixels": (_pixel(3, 5), _pixel(20, 40)),
        "corner_pixel_vs_blob": (_pixel(0, 0), blob),
        "same_mask": (blob, blob),
        "both_empty": (empty, empty),
        "pred_empty": (empty, blob),
        "target_empty": (blob, empty),
    }


CASES = _cases()
NON_EMPTY = [name for name, (p, g) in CASES.items() if p.any() and g.any()]
BATCH_PRED = torch.from_numpy(np.stack([p for p, _ in CASES.values()]))
BATCH_TARGET = torch.from_numpy(np.stack([g for _, g in CASES.values()]))


def brute_force(pred, target, spacing=SPACING, percentile=95.0, mode="max"):
    """The definitions, literally: scipy erosion for the boundary, all pairwise distances."""
    cross = ndimage.generate_binary_structure(2, 1)
    edges = [m ^ ndimage.binary_erosion(m, structure=cross, border_value=0) for m in (pred, target)]
    points = [np.argwhere(e) * np.asarray(spacing) for e in edges]
    if len(points[0]) == 0 and len(points[1]) == 0:
        return dict(hd=0.0, hd95=0.0, assd=0.0)
    if len(points[0]) == 0 or len(points[1]) == 0:
        return dict(hd=np.nan, hd95=np.nan, assd=np.nan)
    pairwise = np.sqrt(((points[0][:, None, :] - points[1][None, :, :]) ** 2).sum(-1))
    d_pg, d_gp = pairwise.min(1), pairwise.min(0)
    both = np.concatenate([d_pg, d_gp])
    hd95 = (max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)) if mode == "max"
            else np.percentile(both, percentile))
    return dict(hd=both.max(), hd95=hd95, assd=both.mean())


def _boundary_points(masks: torch.Tensor) -> torch.Tensor:
    return boundary.mask_boundary(masks).flatten(1).sum(1)


HD95_OF_MODE = {"max": "hd95", "pooled": "hd95_pooled"}


def _reference(pred, target, mode="max", **kwargs):
    """The CPU path's hd, hd95 (of the brute force's `mode`) and assd of one case, as floats."""
    out = boundary_metrics(torch.from_numpy(pred), torch.from_numpy(target), backend="torch", **kwargs)
    return dict(hd=float(out["hd"]), hd95=float(out[HD95_OF_MODE[mode]]), assd=float(out["assd"]))


# ---------------------------------------------------------------- reference against oracles

@pytest.mark.parametrize("name", NON_EMPTY)
def test_reference_matches_medpy_pooled(name):
    from medpy.metric import binary
    pred, target = CASES[name]
    ours = _reference(pred, target, spacing=SPACING, mode="pooled")
    assert ours["hd"] == pytest.approx(binary.hd(pred, target, SPACING, 1), abs=TOL)
    assert ours["hd95"] == pytest.approx(binary.hd95(pred, target, SPACING, 1), abs=TOL)
    assert ours["assd"] == pytest.approx(binary.assd(pred, target, SPACING, 1), abs=TOL)


def test_reference_matches_monai_max():
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    pred, target = BATCH_PRED[:, None].float(), BATCH_TARGET[:, None].float()
    keep = [i for i, name in enumerate(CASES) if name in NON_EMPTY]
    pred, target = pred[keep], target[keep]
    kwargs = dict(include_background=True, spacing=list(SPACING))
    hd = compute_hausdorff_distance(pred, target, **kwargs)[:, 0]
    hd95 = compute_hausdorff_distance(pred, target, percentile=95, **kwargs)[:, 0]
    assd = compute_average_surface_distance(pred, target, symmetric=True, **kwargs)[:, 0]
    ours = boundary_metrics(BATCH_PRED[keep], BATCH_TARGET[keep], spacing=SPACING, backend="torch")
    for name, theirs in (("hd", hd), ("hd95", hd95), ("assd", assd)):
        torch.testing.assert_close(ours[name], theirs.double(), rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize("mode", ["max", "pooled"])
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_brute_force(name, mode):
    pred, target = CASES[name]
    ours, expected = _reference(pred, target, spacing=SPACING, mode=mode), brute_force(pred, target, mode=mode)
    for key in ("hd", "hd95", "assd"):
        assert ours[key] == pytest.approx(expected[key], abs=TOL, nan_ok=True), key


@pytest.mark.parametrize("points_per_pixel,brute_force_pairs", [(0.0, 0), (1e9, 0), (0.0, 1e12)],
                         ids=["distance_transform", "kd_tree", "all_pairs"])
def test_every_distance_engine_is_exact(monkeypatch, points_per_pixel, brute_force_pairs):
    monkeypatch.setattr(boundary, "KD_TREE_POINTS_PER_PIXEL", points_per_pixel)
    monkeypatch.setattr(boundary, "BRUTE_FORCE_PAIRS", brute_force_pairs)
    for name in NON_EMPTY:
        pred, target = CASES[name]
        ours, expected = _reference(pred, target, spacing=SPACING, mode="pooled"), brute_force(pred, target,
                                                                                               mode="pooled")
        for key in ("hd", "hd95", "assd"):
            assert ours[key] == pytest.approx(expected[key], abs=TOL), (name, key)


def _wide_cases():
    """Cases in images whose width is a multiple of 8, where the union box is found eight pixels
    at a time: smooth blobs and blobs touching every edge (KD-tree), speckle (distance
    transform) and lone pixels (all pairs)."""
    rng = np.random.default_rng(5)
    shape = (96, 136)
    edge = np.zeros(shape, dtype=bool)
    edge[0, 3:20] = edge[-1, 100:] = edge[40:60, 0] = edge[:9, -1] = True
    return {
        "blobs": (_blob(rng, shape, sigma=6.0, fraction=0.1), _blob(rng, shape, sigma=6.0, fraction=0.1)),
        "touching_every_edge": (edge | _blob(rng, shape, sigma=6.0, fraction=0.1),
                                np.pad(np.ones((96, 4), dtype=bool), ((0, 0), (0, 132))) | _blob(rng, shape, sigma=6.0,
                                                                                                   fraction=0.1)),
        "speckle": (rng.random(shape) < 0.3, rng.random(shape) < 0.3),
        "lone_pixels": (_pixel(0, 135, shape) | _pixel(95, 0, shape), _pixel(50, 64, shape)),
    }


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.3, 2.1), (3.0, 0.2)])
@pytest.mark.parametrize("name", list(_wide_cases()))
def test_reference_matches_brute_force_in_widths_of_eight_pixels(name, spacing):
    pred, target = _wide_cases()[name]
    for mode in ("max", "pooled"):
        ours, expected = _reference(pred, target, spacing=spacing, mode=mode), brute_force(pred, target, spacing, mode=mode)
        for key in ("hd", "hd95", "assd"):
            assert ours[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), (mode, key)


def test_rows_eight_pixels_at_a_time_equal_any():
    rng = np.random.default_rng(9)
    base = np.zeros((40, 48), dtype=bool)
    base[5:9, 11:30] = rng.random((4, 19)) < 0.5
    base[39, 47] = True
    # contiguous, a row slice, column views at 8-byte and odd offsets, rows of 45 bytes and a transpose (fallback)
    for mask in (base, base[3:], base[:, 8:], base[:, 1:41], base[:, 3:], base.T):
        np.testing.assert_array_equal(boundary._any_along_rows(mask), mask.any(1))


@pytest.mark.parametrize("width", [1, 7, 63, 64, 65, 128, 130])
def test_packed_boundary_points_equal_scipy_erosion(width):
    """The packed words give the boundary's pixels, in row-major order, at every word and frame
    edge: widths around the 64-pixel word, masks touching the image border, views of a wider image."""
    rng = np.random.default_rng(width)
    cross = ndimage.generate_binary_structure(2, 1)
    for height in (1, 2, 5, 17):
        wide = rng.random((height, width + 9)) < rng.uniform(0.3, 0.9)
        for mask in (wide[:, :width], wide[:, 9:], np.ones((height, width), dtype=bool)):
            words = boundary._boundary_words(boundary._packed(mask))
            expected = mask ^ ndimage.binary_erosion(mask, structure=cross, border_value=0)
            np.testing.assert_array_equal(boundary._word_points(words), np.argwhere(expected))
            np.testing.assert_array_equal(boundary._word_image(words, 0, width), expected)


def test_numpy_boundary_equals_torch_boundary_and_scipy_erosion():
    rng = np.random.default_rng(4)
    cross = ndimage.generate_binary_structure(2, 1)
    for shape in [(1, 1), (1, 6), (6, 1), (2, 2), (3, 3), (17, 24)]:
        masks = rng.random((3,) + shape) < 0.6
        ours = boundary.mask_boundary(masks)
        np.testing.assert_array_equal(ours, boundary.mask_boundary(torch.from_numpy(masks)).numpy())
        for m, b in zip(masks, ours):
            np.testing.assert_array_equal(b, m ^ ndimage.binary_erosion(m, structure=cross, border_value=0))


def test_percentile_gives_numpys_bits():
    rng = np.random.default_rng(2)
    for n in [1, 2, 3, 10, 1761]:
        values = rng.random(n) * 40
        values[: n // 3] = np.round(values[: n // 3])  # ties
        for percentile in [0.0, 0.5, 37.5, 50.0, 95.0, 99.9, 100.0, *rng.uniform(0, 100, 5)]:
            assert boundary._percentile(values, percentile) == np.percentile(values, percentile)


@pytest.mark.parametrize("percentile", [0.0, 37.5, 50.0, 99.0, 100.0])
def test_other_percentiles_interpolate_like_numpy(percentile):
    for name in ("blobs", "touching_border", "speckle"):
        pred, target = CASES[name]
        for mode in ("max", "pooled"):
            ours = _reference(pred, target, spacing=SPACING, percentile=percentile, mode=mode)
            expected = brute_force(pred, target, percentile=percentile, mode=mode)
            assert ours["hd95"] == pytest.approx(expected["hd95"], abs=TOL), (name, mode)


def test_odd_sizes_and_isotropic_default_spacing():
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (1, 9), (7, 1), (17, 31), (33, 5)]:
        pred, target = _blob(rng, shape, sigma=1.0), _blob(rng, shape, sigma=1.0)
        ours, expected = _reference(pred, target), brute_force(pred, target, spacing=(1.0, 1.0))
        for key in ("hd", "hd95", "assd"):
            assert ours[key] == pytest.approx(expected[key], abs=TOL, nan_ok=True), (shape, key)


def test_batch_equals_cases_one_at_a_time_and_2d_input_gives_scalars():
    batch = boundary_metrics(BATCH_PRED, BATCH_TARGET, spacing=SPACING, backend="torch")
    assert all(v.shape == (len(CASES),) and v.dtype == torch.float64 for v in batch.values())
    for i in range(len(CASES)):
        single = boundary_metrics(BATCH_PRED[i], BATCH_TARGET[i], spacing=SPACING, backend="torch")
        for key, value in single.items():
            assert value.shape == ()
            torch.testing.assert_close(value, batch[key][i], equal_nan=True)


def test_integer_masks_count_nonzero_as_foreground():
    labels_pred = BATCH_PRED.to(torch.int64) * 2
    labels_target = BATCH_TARGET.to(torch.uint8) * 255
    as_int = boundary_metrics(labels_pred, labels_target, spacing=SPACING, backend="torch")
    as_bool = boundary_metrics(BATCH_PRED, BATCH_TARGET, spacing=SPACING, backend="torch")
    for key in as_bool:
        torch.testing.assert_close(as_int[key], as_bool[key], equal_nan=True)


def test_empty_mask_policy():
    names = list(CASES)
    out = boundary_metrics(BATCH_PRED, BATCH_TARGET, spacing=SPACING, backend="torch")
    for key, value in out.items():
        assert value[names.index("both_empty")] == 0
        assert value[names.index("pred_empty")].isnan() and value[names.index("target_empty")].isnan()
        assert value[names.index("same_mask")] == 0
        assert torch.isfinite(value[[names.index(n) for n in NON_EMPTY]]).all()


# ---------------------------------------------------------------- DeepMind's surface-distance
# A third oracle for HD95 `max`: where it agrees with this project's (and MONAI's) definition and
# by how much it differs elsewhere, which the README states. The difference, precisely:
# surface-distance puts the contour on the grid of pixel corners (each 2x2 neighbourhood codes a
# contour element, half a pixel off the centres of the boundary pixels `M XOR erode(M)` used
# here), weights each element's distance by its length in mm, and takes as the 95th percentile
# the first sorted distance whose cumulative length reaches 95 % (a nearest rank, never
# interpolated); this project and MONAI weight every boundary pixel alike and interpolate
# linearly between ranks.

def _hd95(pred, target, spacing=(1.0, 1.0)) -> float:
    return _reference(pred, target, spacing=spacing)["hd95"]


def _hd95_monai(pred, target, spacing=(1.0, 1.0)) -> float:
    from monai.metrics import compute_hausdorff_distance
    return compute_hausdorff_distance(torch.from_numpy(pred[None, None]), torch.from_numpy(target[None, None]),
                                      percentile=95, spacing=spacing).item()


def _hd95_deepmind(pred, target, spacing=(1.0, 1.0)):
    """(HD95, the sorted distances it ranks) of surface-distance."""
    import surface_distance
    d = surface_distance.compute_surface_distances(target, pred, spacing)
    attained = np.concatenate([d["distances_gt_to_pred"], d["distances_pred_to_gt"]])
    return float(surface_distance.compute_robust_hausdorff(d, 95)), attained


def _box(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_the_three_agree_on_rectangles_and_single_pixels_at_square_pixels():
    for pred, target, spacing in [(_box((40, 60), slice(12, 28), slice(17, 43)), _box((40, 60), slice(10, 30),
                                                                                        slice(15, 45)), (1.0, 1.0)),
                                  (_box((9, 9), 4, 4), _box((9, 9), slice(3, 6), slice(3, 6)), (1.0, 1.0))]:
        value = _hd95(pred, target, spacing)
        assert value == pytest.approx(_hd95_monai(pred, target, spacing), abs=1e-3)
        assert value == pytest.approx(_hd95_deepmind(pred, target, spacing)[0], abs=1e-9)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_elsewhere_deepmind_takes_a_length_weighted_nearest_rank_within_about_a_pixel_of_ours():
    yy, xx = np.mgrid[:40, :60]
    target, pred = (yy - 20) ** 2 + (xx - 30) ** 2 < 144, (yy - 22) ** 2 + (xx - 33) ** 2 < 100
    value, (theirs, attained) = _hd95(pred, target), _hd95_deepmind(pred, target)
    assert value == pytest.approx(_hd95_monai(pred, target), abs=1e-3) and value == pytest.approx(5.3422, abs=1e-4)
    assert theirs == 5.0 and np.isclose(attained, theirs).any()        # a distance that occurs, not interpolated
    # the rectangles the three agree on at square pixels, with 0.5 x 1.3 mm pixels
    inner, outer = _box((40, 60), slice(12, 28), slice(17, 43)), _box((40, 60), slice(10, 30), slice(15, 45))
    assert _hd95(inner, outer, (0.5, 1.3)) == pytest.approx(2.6476, abs=1e-4)
    assert _hd95_deepmind(inner, outer, (0.5, 1.3))[0] == pytest.approx(2.6)

    rng = np.random.default_rng(7)
    differences = []
    for _ in range(20):
        pred, target = _blob(rng, (29, 43)), _blob(rng, (29, 43))
        differences.append(_hd95_deepmind(pred, target)[0] - _hd95(pred, target))
    differences = np.array(differences)
    assert np.abs(differences).max() < 1.2                             # README: within 1.2 px
    assert differences.mean() == pytest.approx(-0.42, abs=0.005)        # README: 0.42 px below ours on average
    assert (differences == 0).sum() == 3 and (differences != 0).sum() == 17


# ---------------------------------------------------------------- Triton path (interpreter)

def _assert_same(a: dict, b: dict):
    # float32 distances in the kernel against float64 in the reference
    assert a.keys() == b.keys() == set(boundary.METRICS)
    for key in boundary.METRICS:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, equal_nan=True, msg=key)


def test_interpreter_matches_reference_on_mixed_batch():
    kwargs = dict(spacing=SPACING)
    _assert_same(boundary_metrics(BATCH_PRED, BATCH_TARGET, backend="interpret", **kwargs),
                 boundary_metrics(BATCH_PRED, BATCH_TARGET, backend="torch", **kwargs))


def test_interpreter_matches_reference_with_many_points_per_case():
    # more boundary points than one query block and one target tile, in an odd-sized image
    rng = np.random.default_rng(11)
    pred = torch.from_numpy(np.stack([_blob(rng, (61, 97), sigma=2.0) for _ in range(2)]))
    target = torch.from_numpy(np.stack([_blob(rng, (61, 97), sigma=2.0) for _ in range(2)]))
    assert _boundary_points(pred).min() > 2 * max(boundary_triton.BLOCK_QUERIES, boundary_triton.BLOCK_TARGETS)
    _assert_same(boundary_metrics(pred, target, spacing=(1.7, 0.6), percentile=90.0, backend="interpret"),
                 boundary_metrics(pred, target, spacing=(1.7, 0.6), percentile=90.0, backend="torch"))


def test_interpreter_fallback_to_cpu_reference(monkeypatch):
    # a model that finds the CPU faster for every case: all go to the CPU reference and must
    # land in the right places of the batch
    monkeypatch.setattr(boundary_triton, "GPU_PAIRS_PER_CPU_POINT", 0.0)
    _assert_same(boundary_metrics(BATCH_PRED, BATCH_TARGET, spacing=SPACING, backend="interpret"),
                 boundary_metrics(BATCH_PRED, BATCH_TARGET, spacing=SPACING, backend="torch"))
    # and a mix: only the cases with the highest pairs per point fall back
    n_p, n_g = _boundary_points(BATCH_PRED).double(), _boundary_points(BATCH_TARGET).double()
    ratio = (n_p * n_g / (n_p + n_g).clamp(min=1)).sort().values
    monkeypatch.setattr(boundary_triton, "GPU_PAIRS_PER_CPU_POINT", float(ratio[-3]))


def test_masks_over_the_row_capacity_fall_back(monkeypatch):
    monkeypatch.setattr(boundary_triton, "MAX_POINTS_PER_MASK", 40)
    assert (_boundary_points(BATCH_PRED) > 40).any() and (_boundary_points(BATCH_PRED)[:-3] <= 40).any()
    _assert_same(boundary_metrics(BATCH_PRED, BATCH_TARGET, spacing=SPACING, backend="interpret"),
                 boundary_metrics(BATCH_PRED, BATCH_TARGET, spacing=SPACING, backend="torch"))


def test_one_host_read_per_batch(monkeypatch):
    """Outside the kernel launches (where the interpreter stands for the device) the Triton path
    reads device values on the host once: the final result."""
    reads, launching = [], [0]
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def method(self, *args, _real=real, _name=name, **kwargs):
            if not launching[0] and self.device.type != "meta":
                reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, method)

    class Launching:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launching[0] += 1
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    launching[0] -= 1
            return run

    for name in ("_count_kernel", "_compact_kernel", "_nearest_kernel"):
        monkeypatch.setattr(boundary_triton, name, Launching(getattr(boundary_triton, name)))
    boundary_triton.boundary_metrics_triton(BATCH_PRED, BATCH_TARGET, SPACING, 95.0)
    assert reads == ["tolist"]


# ---------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs", [
    dict(spacing=(1.0,)), dict(spacing=(1.0, 0.0)), dict(spacing=(-1.0, 1.0)), dict(spacing=(1.0, float("nan"))),
    dict(spacing="1,1"), dict(percentile=-1.0), dict(percentile=100.5), dict(percentile="95"),
    dict(backend="cuda"),
])
def test_invalid_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        boundary_metrics(BATCH_PRED, BATCH_TARGET, **kwargs)


@pytest.mark.parametrize("pred, target", [
    (torch.zeros(2, 5, 6, dtype=torch.bool), torch.zeros(2, 5, 7, dtype=torch.bool)),
    (torch.zeros(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)),
    (torch.zeros(1, 2, 5, 6, dtype=torch.bool), torch.zeros(1, 2, 5, 6, dtype=torch.bool)),
    (torch.zeros(0, 5, 6, dtype=torch.bool), torch.zeros(0, 5, 6, dtype=torch.bool)),
])
def test_bad_shapes_raise_value_error(pred, target):
    with pytest.raises(ValueError):
        boundary_metrics(pred, target)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError):
        boundary_metrics(np.zeros((5, 6), dtype=bool), torch.zeros(5, 6, dtype=torch.bool))
    with pytest.raises(TypeError):
        boundary_metrics(torch.zeros(5, 6), torch.zeros(5, 6))


# an image of 2**31 pixels or more does not fit the kernels' int32 offsets
def test_boundary_image_beyond_int32_is_refused():
    masks = torch.empty((1, 2 ** 16, 2 ** 15), dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="int32"):
        boundary_triton.boundary_metrics_triton(masks, masks, (1.0, 1.0), 95.0)
