"""DeepMind's surface-distance as a third oracle for HD95 `max`: where it agrees with this project's
(and MONAI's) definition and by how much it differs elsewhere, which the README states.

The difference, precisely: surface-distance puts the contour on the grid of pixel corners (each
2x2 neighbourhood codes a contour element, half a pixel off the centres of the boundary pixels
`M XOR erode(M)` used here), weights each element's distance by its length in mm, and takes
as the 95th percentile the first sorted distance whose cumulative length reaches 95 % (a
nearest rank, never interpolated); this project and MONAI weight every boundary pixel alike and
interpolate linearly between ranks."""
import numpy as np
import pytest
import surface_distance
import torch
from monai.metrics import compute_hausdorff_distance
from test_boundary_metrics import _blob

from kernels.boundary_reference import boundary_metrics_reference


def ours(pred, target, spacing=(1.0, 1.0)) -> float:
    return boundary_metrics_reference(torch.from_numpy(pred[None]), torch.from_numpy(target[None]), spacing, 95.0,
                                      "max")["hd95"].item()


def monai(pred, target, spacing=(1.0, 1.0)) -> float:
    return compute_hausdorff_distance(torch.from_numpy(pred[None, None]), torch.from_numpy(target[None, None]),
                                      percentile=95, spacing=spacing).item()


def deepmind(pred, target, spacing=(1.0, 1.0)):
    """(HD95, the sorted distances it ranks) of surface-distance."""
    d = surface_distance.compute_surface_distances(target, pred, spacing)
    attained = np.concatenate([d["distances_gt_to_pred"], d["distances_pred_to_gt"]])
    return float(surface_distance.compute_robust_hausdorff(d, 95)), attained


def box(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_the_three_agree_on_rectangles_and_single_pixels_at_square_pixels():
    for pred, target, spacing in [(box((40, 60), slice(12, 28), slice(17, 43)), box((40, 60), slice(10, 30),
                                                                                      slice(15, 45)), (1.0, 1.0)),
                                  (box((9, 9), 4, 4), box((9, 9), slice(3, 6), slice(3, 6)), (1.0, 1.0))]:
        value = ours(pred, target, spacing)
        assert value == pytest.approx(monai(pred, target, spacing), abs=1e-3)
        assert value == pytest.approx(deepmind(pred, target, spacing)[0], abs=1e-9)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_elsewhere_deepmind_takes_a_length_weighted_nearest_rank_within_about_a_pixel_of_ours():
    yy, xx = np.mgrid[:40, :60]
    target, pred = (yy - 20) ** 2 + (xx - 30) ** 2 < 144, (yy - 22) ** 2 + (xx - 33) ** 2 < 100
    value, (theirs, attained) = ours(pred, target), deepmind(pred, target)
    assert value == pytest.approx(monai(pred, target), abs=1e-3) and value == pytest.approx(5.3422, abs=1e-4)
    assert theirs == 5.0 and np.isclose(attained, theirs).any()        # a distance that occurs, not interpolated
    # the rectangles the three agree on at square pixels, with 0.5 x 1.3 mm pixels
    inner, outer = box((40, 60), slice(12, 28), slice(17, 43)), box((40, 60), slice(10, 30), slice(15, 45))
    assert ours(inner, outer, (0.5, 1.3)) == pytest.approx(2.6476, abs=1e-4)
    assert deepmind(inner, outer, (0.5, 1.3))[0] == pytest.approx(2.6)

    rng = np.random.default_rng(7)
    differences = []
    for _ in range(20):
        pred, target = _blob(rng, (29, 43)), _blob(rng, (29, 43))
        differences.append(deepmind(pred, target)[0] - ours(pred, target))
    differences = np.array(differences)
    assert np.abs(differences).max() < 1.2                             # README: within 1.2 px
    assert differences.mean() == pytest.approx(-0.42, abs=0.005)        # README: 0.42 px below ours on average
    assert (differences == 0).sum() == 3 and (differences != 0).sum() == 17
