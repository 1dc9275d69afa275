"""Logits of any strides are read in place, the gradient comes back in the input's memory format,
and neither forward nor backward reads a device value on the host (interpreter)."""
import pytest
import torch

from kernels import kd_triton, weighted_kd_loss
from kernels.kd_reference import kd_loss_reference, weight_map_reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
SHAPE = (2, 3, 6, 11)


def logits(seed=31):
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(SHAPE, generator=gen)
    return student, student + 2 * torch.randn(SHAPE, generator=gen)


def layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # every other column of a wider tensor: dense in no format
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def reference_grad(student, teacher, mode):
    s64 = student.detach().double().requires_grad_()
    kd_loss_reference(s64, teacher.double(), weight_map_reference(s64, teacher.double(), mode), 2.0).backward()
    return s64.grad


@pytest.mark.parametrize("mode", ["agree", "ssim"])
@pytest.mark.parametrize("student_layout,teacher_layout", [("contiguous", "contiguous"),
                                                           ("channels_last", "channels_last"),
                                                           ("channels_last", "contiguous"),
                                                           ("strided", "channels_last")])
def test_layouts_in_and_gradient_out(monkeypatch, mode, student_layout, teacher_layout):
    student, teacher = logits()
    s = layout(student, student_layout).requires_grad_()
    t = layout(teacher, teacher_layout)
    launches = []
    real_plan = kd_triton.plan
    monkeypatch.setattr(kd_triton, "plan", lambda *a, **k: launches.append(real_plan(*a, **k)) or launches[-1])
    weighted_kd_loss(s, t, weight=mode, temperature=2.0, backend="interpret").backward()

    # no copy: every launch reads the caller's own storage
    assert all(l.args[0].data_ptr() == s.data_ptr() and l.args[1].data_ptr() == t.data_ptr() for l in launches)
    if student_layout == "channels_last":
        assert s.grad.is_contiguous(memory_format=torch.channels_last) and s.grad.stride() == s.stride()
    elif student_layout == "contiguous":
        assert s.grad.is_contiguous()
    expected = reference_grad(student, teacher, mode)
    torch.testing.assert_close(s.grad.double(), expected, rtol=0, atol=2e-5 * expected.abs().max().item())


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("mode", ["none", "agree", "tensor", "ssim"])
def test_channels_last_without_padded_classes_takes_compile_time_strides(monkeypatch, classes, mode):
    gen = torch.Generator().manual_seed(classes)
    student = (3 * torch.randn(2, classes, 5, 9, generator=gen)).contiguous(memory_format=torch.channels_last)
    teacher = (student + 2 * torch.randn(student.shape, generator=gen)).contiguous(memory_format=torch.channels_last)
    weight = torch.rand(2, 5, 9, generator=gen) if mode == "tensor" else mode
    launches = []
    real_plan = kd_triton.plan
    monkeypatch.setattr(kd_triton, "plan", lambda *a, **k: launches.append(real_plan(*a, **k)) or launches[-1])
    s = student.clone().requires_grad_()
    loss = weighted_kd_loss(s, teacher, weight=weight, temperature=2.0, backend="interpret")
    loss.backward()
    assert launches and all(launch.constexprs["CLASSES_LAST"] for launch in launches)
    w64 = weight.double() if mode == "tensor" else weight_map_reference(student.double(), teacher.double(), mode)
    s64 = student.double().requires_grad_()
    ref = kd_loss_reference(s64, teacher.double(), w64, 2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=0)
    assert s.grad.stride() == s.stride()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=2e-5 * s64.grad.abs().max().item())
    if mode == "agree":  # the weight map keeps its own (N, H, W) strides
        from kernels import kd_weight_map
        torch.testing.assert_close(kd_weight_map(student, teacher, "agree", backend="interpret").double(),
                                   w64, rtol=0, atol=1e-6)
    launches.clear()
    weighted_kd_loss(s, teacher.contiguous(), weight=weight, temperature=2.0, backend="interpret")
    assert not any(launch.constexprs["CLASSES_LAST"] for launch in launches)


@pytest.mark.parametrize("shape", [(1, 2, 140, 9), (1, 8, 2, 600)])  # several tiles down, across
@pytest.mark.parametrize("mode", ["none", "agree", "tensor"])
def test_channels_last_tiles_cover_the_image(shape, mode):
    """Channels-last rows loaded as runs: tiles past the first row and column of tiles, partial
    ones at the edges, and the uniform weight's sums counted from the tile bounds."""
    gen = torch.Generator().manual_seed(shape[1])
    student = (3 * torch.randn(shape, generator=gen)).contiguous(memory_format=torch.channels_last)
    teacher = (student + 2 * torch.randn(shape, generator=gen)).contiguous(memory_format=torch.channels_last)
    weight = torch.rand(shape[0], *shape[2:], generator=gen) if mode == "tensor" else mode
    launch = kd_triton.plan(student, teacher, "loss", mode, weight=weight if mode == "tensor" else None)
    rows, cols = launch.constexprs["ROWS"], launch.constexprs["COLS"]
    assert launch.constexprs["CLASSES_LAST"] and (shape[2] > rows or shape[3] > cols)
    launch()
    w64 = weight.double() if mode == "tensor" else weight_map_reference(student.double(), teacher.double(), mode)
    torch.testing.assert_close(launch.parts[1].double().sum(), w64.sum(), rtol=1e-6, atol=0)
    s = student.clone().requires_grad_()
    loss = weighted_kd_loss(s, teacher, weight=weight, temperature=2.0, backend="interpret")
    loss.backward()
    s64 = student.double().requires_grad_()
    ref = kd_loss_reference(s64, teacher.double(), w64, 2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=0)
    assert s.grad.stride() == s.stride()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=2e-5 * s64.grad.abs().max().item())


def test_strided_weight_tensor_is_read_in_place():
    student, teacher = logits(32)
    weight = torch.rand(SHAPE[0], SHAPE[3], SHAPE[2], generator=torch.Generator().manual_seed(1)).transpose(1, 2)
    s = student.clone().requires_grad_()
    loss = weighted_kd_loss(s, teacher, weight=weight, temperature=2.0, backend="interpret")
    loss.backward()
    s64 = student.double().requires_grad_()
    ref = kd_loss_reference(s64, teacher.double(), weight.double(), 2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=2e-5 * s64.grad.abs().max().item())


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Make every host read of a tensor's value raise, except inside a kernel launch (the
    interpreter stands for the device there and reads its arguments)."""
    state = {"launching": 0}

    def guard(name, real):
        def method(self, *args, **kwargs):
            if not state["launching"]:
                raise AssertionError(f"host read Tensor.{name} outside a kernel launch")
            return real(self, *args, **kwargs)
        return method

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    real_call = kd_triton.Launch.__call__

    def launch(self):
        state["launching"] += 1
        try:
            real_call(self)
        finally:
            state["launching"] -= 1

    monkeypatch.setattr(kd_triton.Launch, "__call__", launch)


@pytest.mark.parametrize("mode,reduction", [("none", "mean"), ("agree", "weighted_mean"), ("ssim", "weighted_mean")])
def test_forward_and_backward_never_read_device_values(forbid_host_reads, mode, reduction):
    student, teacher = logits(33)
    s = student.clone().requires_grad_()
    loss = weighted_kd_loss(s, teacher, weight=mode, reduction=reduction, backend="interpret")
    (loss * 1024.0).backward()
    assert s.grad is not None


def test_host_read_guard_catches_a_read(forbid_host_reads):
    with pytest.raises(AssertionError, match="host read"):
        float(torch.ones(()))
