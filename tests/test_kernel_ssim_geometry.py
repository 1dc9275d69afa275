"""The ssim kernel's strips, row chunks and windows: narrow strips and short chunks (patched
small) so that a small image crosses several of each, against the float64 reference."""
import pytest
import torch

from kernels import kd_triton, kd_weight_map, weighted_kd_loss
from kernels.kd_reference import kd_loss_reference, weight_map_reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# (window, strip lanes, chunk rows, shape): each crosses strips; all but the widest window cross chunks
GEOMETRIES = [(1, 16, 3, (2, 5, 7, 21)), (3, 16, 3, (1, 3, 7, 30)), (7, 16, 4, (1, 2, 7, 20)),
              (15, 32, 8, (1, 8, 6, 20))]


@pytest.mark.parametrize("window,lanes,chunk_rows,shape", GEOMETRIES)
def test_weight_map_and_gradient_across_strips_and_chunks(monkeypatch, window, lanes, chunk_rows, shape):
    monkeypatch.setattr(kd_triton, "SSIM_LANES", lanes)
    monkeypatch.setattr(kd_triton, "SSIM_CHUNK_ROWS", chunk_rows)
    gen = torch.Generator().manual_seed(window)
    student = 3 * torch.randn(shape, generator=gen)
    teacher = student + 2 * torch.randn(shape, generator=gen)
    s = student.clone().requires_grad_()
    loss = weighted_kd_loss(s, teacher, weight="ssim", window=window, gamma=1.5, temperature=2.0,
                            backend="interpret")
    loss.backward()
    weight = kd_weight_map(student, teacher, "ssim", window=window, gamma=1.5, backend="interpret")

    s64, t64 = student.double().requires_grad_(), teacher.double()
    expected_weight = weight_map_reference(s64, t64, "ssim", window, 1.5)
    expected = kd_loss_reference(s64, t64, expected_weight, 2.0)
    expected.backward()
    assert expected_weight.min() < 0.9
    torch.testing.assert_close(weight.double(), expected_weight, rtol=0, atol=2e-4)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=1e-4 * s64.grad.abs().max().item())
