"""Index limits: batch offsets in int64 and a one-dimensional grid (no limit on N from a grid
axis); offsets inside one image in int32, refused with a clear error beyond it."""
import pytest
import torch

from kernels import kd_triton
from kernels.boundary_triton import boundary_metrics_triton


def meta(shape, **kwargs):
    return torch.empty(shape, device="meta", **kwargs)


def test_batch_beyond_a_grid_axis_and_beyond_int32_plans_one_axis():
    # 2**17 images: more than a CUDA grid's y or z axis holds; 2**33 logits in all
    student = meta((2 ** 17, 2, 128, 256))
    for phase, mode, out in (("grad", "none", student), ("loss_and_weight", "ssim", meta((2 ** 17, 128, 256)))):
        launch = kd_triton.plan(student, student, phase, mode, out=out, scale=meta(()))
        assert launch.grid >= 2 ** 17 and launch.args[0] is student


# 2**31 elements would still fit (the last offset is 2**31 - 1): one row more does not
@pytest.mark.parametrize("shape,memory_format", [((1, 2, 2 ** 15 + 1, 2 ** 15), torch.contiguous_format),
                                                 ((1, 8, 2 ** 14 + 1, 2 ** 14), torch.channels_last)])
def test_an_image_beyond_int32_offsets_is_refused(shape, memory_format):
    student = meta(shape, memory_format=memory_format)
    with pytest.raises(ValueError, match="int32"):
        kd_triton.plan(student, student, "loss", "agree")


def test_boundary_image_beyond_int32_is_refused():
    masks = torch.empty((1, 2 ** 16, 2 ** 15), dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="int32"):
        boundary_metrics_triton(masks, masks, (1.0, 1.0), 95.0, "max")
