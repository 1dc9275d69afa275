"""Weighted KD loss: Triton kernels (via the interpreter) against the float64 reference, and the
reference against independent oracles (a numpy window loop, F.kl_div)."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

import kernels
from kernels import kd_loss, kd_triton
from kernels.kd_loss import (WEIGHT_MODES, kd_loss_reference, kd_weight_map, weight_map_reference, weight_mode,
                             weighted_kd_loss)

# The interpreter evaluates masked-off lanes too (0/0 outside the image, log2(0)); numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SHAPES = [(2, 2, 33, 47), (1, 3, 16, 64), (1, 8, 5, 9)]
# The ssim kernel walks down the rows one at a time: in the interpreter its cost grows with the
# rows, so it gets shorter images (several strips, chunks and windows are covered in
# the strip tests below).
SSIM_SHAPES = [(2, 2, 9, 20), (1, 3, 7, 12), (1, 8, 5, 9)]
MODES = ["none", "agree", "ssim"]
REDUCTIONS = ["weighted_mean", "mean", "sum"]
# float32 variances E[q^2] - E[q]^2 of nearly saturated probabilities lose ~1e-7 absolute,
# which the SSIM ratio divides by c2 = 9e-4: 1e-4 is float32's honest accuracy here, 2e-4 when
# the foreground sums 7 class probabilities (C = 8).
SSIM_ATOL = 2e-4


def logits(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(shape, generator=gen)
    # A teacher correlated with the student, so that the ssim weight spans (0, 1).
    teacher = student + 2 * torch.randn(shape, generator=gen)
    return student.to(dtype), teacher.to(dtype)


def reference(student, teacher, weight, temperature, reduction, window=7, gamma=1.0, map_t=1.0):
    """Float64 loss and student gradient of the reference on the same (rounded) inputs."""
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double()
    if isinstance(weight, str):
        weight = weight_map_reference(s64, t64, weight, window, gamma, map_t)
    loss = kd_loss_reference(s64, t64, weight.double(), temperature, reduction)
    loss.backward()
    return loss.detach(), s64.grad


def loss_and_grad(student, teacher, **kwargs):
    student = student.detach().clone().requires_grad_()
    loss = weighted_kd_loss(student, teacher, **kwargs)
    loss.backward()
    return loss.detach(), student.grad


def assert_grad_close(grad, expected, rel):
    scale = expected.abs().max().item()
    torch.testing.assert_close(grad.double(), expected, rtol=0, atol=rel * scale)


def _loss_cases():
    for mode in ("none", "agree"):
        for shape in SHAPES:
            for reduction in REDUCTIONS:
                for temperature in (1.0, 2.5):
                    yield shape, mode, reduction, temperature
    # ssim: each reduction and temperature once, each shape once
    first, *others = SSIM_SHAPES
    yield from [(first, "ssim", "weighted_mean", 1.0), (first, "ssim", "mean", 2.5), (first, "ssim", "sum", 2.5)]
    yield from [(shape, "ssim", "weighted_mean", 2.5) for shape in others]


@pytest.mark.parametrize("shape,mode,reduction,temperature", list(_loss_cases()))
def test_loss_and_grad_match_float64_reference(shape, mode, reduction, temperature):
    student, teacher = logits(shape, seed=sum(shape))
    loss, grad = loss_and_grad(student, teacher, weight=mode, temperature=temperature,
                               reduction=reduction, backend="interpret")
    ref_loss, ref_grad = reference(student, teacher, mode, temperature, reduction)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=0)
    assert_grad_close(grad, ref_grad, 2e-5)


@pytest.mark.parametrize("shape", SSIM_SHAPES)
@pytest.mark.parametrize("mode,window,gamma,map_t", [("agree", 7, 1.0, 1.0), ("ssim", 7, 1.0, 1.0),
                                                     ("ssim", 3, 1.0, 4.0), ("ssim", 5, 2.0, 1.0)])
def test_weight_map_matches_reference(shape, mode, window, gamma, map_t):
    student, teacher = logits(shape, seed=7)
    w = kd_weight_map(student, teacher, mode, window, gamma, map_t, backend="interpret")
    ref = weight_map_reference(student.double(), teacher.double(), mode, window, gamma, map_t)
    assert w.shape == ref.shape and ref.min() < 0.9  # the weight is not trivially all ones
    torch.testing.assert_close(w.double(), ref, rtol=0, atol=SSIM_ATOL)


def test_ssim_loss_with_soft_maps_and_a_small_window_matches_float64_reference():
    student, teacher = logits(SSIM_SHAPES[0], seed=21)
    loss, grad = loss_and_grad(student, teacher, weight="ssim", window=3, map_temperature=4.0, backend="interpret")
    ref_loss, ref_grad = reference(student, teacher, "ssim", 1.0, "weighted_mean", window=3, map_t=4.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-4, atol=0)
    assert_grad_close(grad, ref_grad, 2e-4)


def test_weight_map_none_is_ones():
    student, teacher = logits((2, 2, 5, 6), seed=1)
    assert torch.equal(kd_weight_map(student, teacher, "none", backend="interpret"),
                       torch.ones(2, 5, 6))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_gradcheck(mode, reduction):
    student, teacher = logits((1, 3, 5, 6), seed=3, dtype=torch.float64)
    # The weight is a constant: fix it, as the loss does, before differentiating.
    weight = weight_map_reference(student, teacher, mode)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: kd_loss_reference(s, teacher, weight, 2.5, reduction), (student,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_inputs(dtype, mode):
    student, teacher = logits((2, 2, 9, 20), seed=11, dtype=dtype)
    loss, grad = loss_and_grad(student, teacher, weight=mode, temperature=2.5, backend="interpret")
    ref_loss, ref_grad = reference(student, teacher, mode, 2.5, "weighted_mean")
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # Inputs are the same rounded values and arithmetic is float32: only the gradient's
    # final rounding to the input dtype separates the two.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=0)
    assert_grad_close(grad, ref_grad, 2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_caller_weight_tensor(reduction):
    student, teacher = logits((2, 3, 9, 13), seed=5)
    weight = torch.rand(2, 9, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, grad = loss_and_grad(student, teacher, weight=weight, reduction=reduction,
                               temperature=2.5, backend="interpret")
    ref_loss, ref_grad = reference(student, teacher, weight, 2.5, reduction)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=0)
    assert_grad_close(grad, ref_grad, 2e-5)


@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_all_zero_weight_gives_zero_not_nan(backend):
    student, teacher = logits((1, 2, 4, 5), seed=2)
    loss, grad = loss_and_grad(student, teacher, weight=torch.zeros(1, 4, 5), backend=backend)
    assert loss.item() == 0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend", ["interpret", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_teacher_gets_no_gradient(backend, mode):
    student, teacher = logits((1, 2, 6, 7), seed=4)
    student.requires_grad_()
    teacher.requires_grad_()
    weighted_kd_loss(student, teacher, weight=mode, backend=backend).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("mode,reduction", [("none", "weighted_mean"), ("agree", "weighted_mean"),
                                            ("ssim", "weighted_mean"), ("ssim", "sum")])
def test_grad_output_scales_gradient(mode, reduction):
    student, teacher = logits((1, 2, 6, 10), seed=6)
    _, grad = loss_and_grad(student, teacher, weight=mode, reduction=reduction, backend="interpret")
    s = student.clone().requires_grad_()
    (weighted_kd_loss(s, teacher, weight=mode, reduction=reduction, backend="interpret") * -3.5).backward()
    torch.testing.assert_close(s.grad, -3.5 * grad, rtol=1e-6, atol=0)


def test_repeated_backward_with_retained_graph():
    student, teacher = logits((1, 2, 8, 9), seed=8)
    student.requires_grad_()
    loss = weighted_kd_loss(student, teacher, weight="agree", backend="interpret")
    first, = torch.autograd.grad(loss, student, retain_graph=True)
    second, = torch.autograd.grad(2 * loss, student)
    torch.testing.assert_close(second, 2 * first, rtol=1e-6, atol=0)


def test_no_gradient_requested():
    student, teacher = logits((1, 3, 7, 9), seed=9)
    loss = weighted_kd_loss(student, teacher, backend="interpret")
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), reference(student, teacher, "ssim", 1.0, "weighted_mean")[0],
                               rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend", ["interpret", "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_non_finite_input_gives_non_finite_loss(backend, mode, bad, where):
    student, teacher = logits((1, 2, 6, 8), seed=10)
    (student if where == "student" else teacher)[0, 1, 4, 5] = bad
    loss = weighted_kd_loss(student, teacher, weight=mode, backend=backend)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("mode", MODES)
def test_interpret_and_torch_backends_agree(mode):
    student, teacher = logits((2, 3, 6, 14), seed=12)
    loss_i, grad_i = loss_and_grad(student, teacher, weight=mode, temperature=2.5, backend="interpret")
    loss_t, grad_t = loss_and_grad(student, teacher, weight=mode, temperature=2.5, backend="torch")
    assert loss_i.dtype == loss_t.dtype and grad_i.dtype == grad_t.dtype
    torch.testing.assert_close(loss_i, loss_t, rtol=1e-5, atol=0)
    assert_grad_close(grad_i, grad_t.double(), 1e-5)
    torch.testing.assert_close(kd_weight_map(student, teacher, mode, backend="interpret"),
                               kd_weight_map(student, teacher, mode, backend="torch"),
                               rtol=0, atol=SSIM_ATOL)


def test_default_backend_on_cpu_is_interpreter(monkeypatch):
    student, teacher = logits((1, 2, 5, 6), seed=13)
    expected = weighted_kd_loss(student, teacher, backend="interpret")
    # the two paths agree to rounding, so only cutting the torch path off tells which one ran
    def torch_path(*args):
        raise AssertionError("the default backend ran the torch reference")
    monkeypatch.setattr(kd_loss, "kd_loss_reference", torch_path)
    monkeypatch.setattr(kd_loss, "weight_map_reference", torch_path)
    torch.testing.assert_close(weighted_kd_loss(student, teacher), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(student=(2, 2, 5), teacher=(2, 2, 5)), "N, C, H, W"),
    (dict(teacher=(1, 2, 5, 7)), "differs"),
    (dict(student=(1, 1, 5, 6), teacher=(1, 1, 5, 6)), "between 2 and 8"),
    (dict(student=(1, 9, 5, 6), teacher=(1, 9, 5, 6)), "between 2 and 8"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(window=4), "window"),
    (dict(window=0), "window"),
    (dict(window=17), "window"),
    (dict(gamma=0.0), "gamma"),
    (dict(reduction="max"), "reduction"),
    (dict(weight="entropy"), "weight mode"),
    (dict(weight=torch.ones(1, 5, 7)), "weight tensor shape"),
    (dict(backend="cuda"), "backend"),
    (dict(backend="triton"), "CUDA"),
])
def test_invalid_arguments_raise(kwargs, match):
    student = torch.randn(kwargs.pop("student", (1, 2, 5, 6)))
    teacher = torch.randn(kwargs.pop("teacher", tuple(student.shape)))
    with pytest.raises(ValueError, match=match):
        weighted_kd_loss(student, teacher, **kwargs)


def test_interpreter_rejects_float64():
    student, teacher = logits((1, 2, 5, 6), seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        weighted_kd_loss(student, teacher, backend="interpret")


# Independent checks of the reference itself.

def numpy_ssim_weight(qt, qs, window, gamma):
    """SSIM weight by an explicit loop over clipped windows, in float64."""
    h, w = qt.shape
    r = window // 2
    out = np.empty((h, w))
    for i in range(h):
        for j in range(w):
            a = qt[max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1].ravel()
            b = qs[max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1].ravel()
            cov = ((a - a.mean()) * (b - b.mean())).mean()
            ssim = ((2 * a.mean() * b.mean() + 1e-4) * (2 * cov + 9e-4)) / (
                (a.mean() ** 2 + b.mean() ** 2 + 1e-4) * (a.var() + b.var() + 9e-4))
            out[i, j] = min(max(ssim, 0.0), 1.0) ** gamma
    return out


@pytest.mark.parametrize("channels,window,gamma,map_t", [(2, 3, 1.0, 1.0), (2, 5, 1.0, 1.0), (4, 3, 2.0, 1.0),
                                                         (8, 5, 1.0, 1.0), (2, 3, 1.0, 4.0), (3, 5, 1.0, 0.5)])
def test_reference_ssim_weight_against_numpy_loop(channels, window, gamma, map_t):
    student, teacher = logits((1, channels, 6, 7), seed=14, dtype=torch.float64)
    w = weight_map_reference(student, teacher, "ssim", window, gamma, map_t)[0].numpy()
    foreground = lambda z: 1 - (z / map_t).softmax(1)[0, 0].numpy()  # noqa: E731  "not background"
    expected = numpy_ssim_weight(foreground(teacher), foreground(student), window, gamma)
    np.testing.assert_allclose(w, expected, rtol=1e-10, atol=1e-12)


def test_reference_agree_weight_is_probability_overlap():
    student, teacher = logits((2, 4, 5, 6), seed=15, dtype=torch.float64)
    overlap = torch.minimum(student.softmax(1), teacher.softmax(1)).sum(1)  # 1 - TV distance
    torch.testing.assert_close(weight_map_reference(student, teacher, "agree"), overlap)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_reference_kl_against_kl_div(temperature):
    student, teacher = logits((2, 3, 5, 6), seed=16, dtype=torch.float64)
    ones = torch.ones(2, 5, 6, dtype=torch.float64)
    expected = temperature ** 2 * F.kl_div(F.log_softmax(student / temperature, 1),
                                           F.softmax(teacher / temperature, 1), reduction="sum")
    torch.testing.assert_close(kd_loss_reference(student, teacher, ones, temperature, "sum"), expected)
    torch.testing.assert_close(kd_loss_reference(student, teacher, ones, temperature, "mean"),
                               expected / (2 * 5 * 6))


# ---------------------------------------------------------------------------------------------
# Half-precision gradients rounded once: under a loss scale, where w_i / Z underflows float16,
# the Triton gradient (interpreter) is the float64 oracle's gradient rounded to the input dtype.
#
# The oracle takes the kernel's own float32 weight map: how exactly a weight is computed is the
# weight tests' business (an ssim weight is good to ~1e-4); here the question is whether the
# gradient t * w * (pS - pT) * grad_output / Z reaches the input dtype intact.

LOSS_SCALE = 65536.0
EXACT_SHAPE = (1, 3, 6, 10)


def half_ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """Half the spacing of `dtype` at |x|, subnormals included."""
    info = torch.finfo(dtype)
    magnitude = x.abs().clamp(min=info.smallest_normal)
    return 0.5 * info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))


def scaled_inputs(dtype, weight_kind, shape=EXACT_SHAPE, memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(21)
    student = (3 * torch.randn(shape, generator=gen)).to(dtype)
    teacher = (student.float() + 2 * torch.randn(shape, generator=gen)).to(dtype)
    student, teacher = (x.contiguous(memory_format=memory_format) for x in (student, teacher))
    if weight_kind != "heavy":
        return student, teacher, weight_kind
    # Z = sum w is large while most gradient entries carry w_i = 1: w_i / Z ~ 1e-6, whose
    # products with t * (pS - pT) lie below float16's smallest subnormal, as 1/Z does at the
    # benchmark size (16, 2, 512, 1024) with w = 1.
    weight = torch.ones(shape[0], *shape[2:], dtype=torch.float64)
    weight[0, ::3, ::4] = 2.0 ** 24
    return student, teacher, weight


@pytest.mark.parametrize("shape,memory_format", [(EXACT_SHAPE, torch.contiguous_format),
                                                 ((1, 2, 6, 10), torch.channels_last)],
                         ids=["C=3", "C=2-channels-last"])  # the general path; the two-class one
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_kind,reduction", [("heavy", "weighted_mean"), ("none", "mean"),
                                                   ("agree", "weighted_mean"), ("ssim", "weighted_mean")])
def test_scaled_gradient_is_the_oracle_rounded_once(dtype, weight_kind, reduction, shape, memory_format):
    student, teacher, weight = scaled_inputs(dtype, weight_kind, shape, memory_format)
    s = student.clone().requires_grad_()
    (weighted_kd_loss(s, teacher, weight=weight, temperature=2.0, reduction=reduction,
                      backend="interpret") * LOSS_SCALE).backward()

    s64 = student.double().requires_grad_()
    w64 = kd_weight_map(student, teacher, weight, backend="interpret").double() if isinstance(weight, str) else weight
    (kd_loss_reference(s64, teacher.double(), w64, 2.0, reduction) * LOSS_SCALE).backward()
    expected = s64.grad
    z = w64.sum() if reduction == "weighted_mean" else w64.numel()
    if weight_kind == "heavy" and dtype == torch.float16:
        # the test is where it matters: unscaled, most of the gradient would underflow
        assert (expected / LOSS_SCALE).abs().lt(torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps).float().mean() > 0.5
    assert s.grad.dtype == dtype and s.grad.stride() == student.stride()
    error = (s.grad.double() - expected).abs()
    # float32 probabilities carry ~eps32 absolute error, so pS - pT is good to a few eps32 times
    # the pixel's factor scale * t * w / Z. Triton's interpreter casts float32 to bfloat16 by
    # truncation whatever the rounding mode (a GPU rounds to nearest, which bench/gpu_check.py
    # checks at half an ulp): a whole ulp for bfloat16 here.
    rounding = 2 if dtype == torch.bfloat16 else 1
    factor = (LOSS_SCALE * 2.0 * w64 / z)[:, None]
    allowed = rounding * half_ulp(expected, dtype) + 8 * torch.finfo(torch.float32).eps * factor
    bad = error > allowed
    assert not bool(bad.any()), f"{int(bad.sum())} of {error.numel()} off: {s.grad[bad][:3]} vs {expected[bad][:3]}"
    assert torch.count_nonzero(s.grad) == torch.count_nonzero(expected.to(dtype))


# ---------------------------------------------------------------------------------------------
# Logits of any strides are read in place, the gradient comes back in the input's memory format,
# and neither forward nor backward reads a device value on the host (interpreter).

LAYOUT_SHAPE = (2, 3, 6, 11)


def layout_logits(seed=31):
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(LAYOUT_SHAPE, generator=gen)
    return student, student + 2 * torch.randn(LAYOUT_SHAPE, generator=gen)


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
    student, teacher = layout_logits()
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


def assert_loss_and_grad_at_t2(student, teacher, weight, w64):
    """Loss and student gradient at temperature 2 (interpreter) against float64, the gradient in
    the student's own strides."""
    s = student.clone().requires_grad_()
    loss = weighted_kd_loss(s, teacher, weight=weight, temperature=2.0, backend="interpret")
    loss.backward()
    s64 = student.double().requires_grad_()
    ref = kd_loss_reference(s64, teacher.double(), w64, 2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=0)
    assert s.grad.stride() == s.stride()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=2e-5 * s64.grad.abs().max().item())


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
    w64 = weight.double() if mode == "tensor" else weight_map_reference(student.double(), teacher.double(), mode)
    assert_loss_and_grad_at_t2(student, teacher, weight, w64)
    assert launches and all(launch.constexprs["CLASSES_LAST"] for launch in launches)
    if mode == "agree":  # the weight map keeps its own (N, H, W) strides
        torch.testing.assert_close(kd_weight_map(student, teacher, "agree", backend="interpret").double(),
                                   w64, rtol=0, atol=1e-6)
    launches.clear()
    weighted_kd_loss(student, teacher.contiguous(), weight=weight, temperature=2.0, backend="interpret")
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
    assert_loss_and_grad_at_t2(student, teacher, weight, w64)


def test_strided_weight_tensor_is_read_in_place():
    student, teacher = layout_logits(32)
    n, _, h, w = LAYOUT_SHAPE
    weight = torch.rand(n, w, h, generator=torch.Generator().manual_seed(1)).transpose(1, 2)
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
    student, teacher = layout_logits(33)
    s = student.clone().requires_grad_()
    loss = weighted_kd_loss(s, teacher, weight=mode, reduction=reduction, backend="interpret")
    (loss * 1024.0).backward()
    assert s.grad is not None


def test_host_read_guard_catches_a_read(forbid_host_reads):
    with pytest.raises(AssertionError, match="host read"):
        float(torch.ones(()))


# ---------------------------------------------------------------------------------------------
# The ssim kernel's strips, row chunks and windows: narrow strips and short chunks (patched
# small) so that a small image crosses several of each, against the float64 reference.

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


# ---------------------------------------------------------------------------------------------
# Weight modes are a registry: a mode registered with one function works through the torch and
# the interpreter backends, the latter with its reference weight map and a one-time note.

def foreground_gap(zs, zt, **_options):
    """A throw-away mode: 1 - |qT - qS| of the foreground probabilities."""
    return 1 - (zt.softmax(1)[:, 0] - zs.softmax(1)[:, 0]).abs()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(kd_loss, "_warned_modes", set())
    monkeypatch.delitem(WEIGHT_MODES, "gap", raising=False)
    weight_mode("gap")(foreground_gap)
    yield "gap"
    del WEIGHT_MODES["gap"]


def test_registry_lists_the_shipped_modes():
    assert list(kernels.WEIGHT_MODES)[:3] == ["none", "agree", "ssim"]
    assert kernels.WEIGHT_MODES is WEIGHT_MODES


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_registered_mode_runs_on_both_backends(registered, backend):
    gen = torch.Generator().manual_seed(41)
    student, teacher = 3 * torch.randn(2, 3, 5, 7, generator=gen), 3 * torch.randn(2, 3, 5, 7, generator=gen)
    s = student.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = weighted_kd_loss(s, teacher, weight=registered, temperature=1.5, backend=backend)
        loss.backward()
        weight = kd_weight_map(student, teacher, registered, backend=backend)
        weighted_kd_loss(student, teacher, weight=registered, backend=backend)
    notes = [w for w in caught if "no Triton kernel" in str(w.message)]
    assert len(notes) == (1 if backend == "interpret" else 0)

    # the oracle: the definition written out in float64, independent of the registry
    s64, t64 = student.double().requires_grad_(), teacher.double()
    expected_weight = 1 - (t64.softmax(1)[:, 0] - s64.detach().softmax(1)[:, 0]).abs()
    expected = kd_loss_reference(s64, t64, expected_weight, 1.5)
    expected.backward()
    torch.testing.assert_close(weight.double(), expected_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=0)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=2e-5 * s64.grad.abs().max().item())


def test_unknown_mode_is_a_value_error_on_the_kernel_path():
    with pytest.raises(ValueError, match="weight mode"):
        weighted_kd_loss(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), weight="gap", backend="interpret")


# ---------------------------------------------------------------------------------------------
# Index limits: batch offsets in int64 and a one-dimensional grid (no limit on N from a grid
# axis); offsets inside one image in int32, refused with a clear error beyond it.

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


# ---------------------------------------------------------------------------------------------
# Triton is optional (requirements.txt installs it on Linux only): without it `kernels` imports,
# both ops run their torch paths, and the Triton backends are refused with a ValueError.

WITHOUT_TRITON = """
import json, sys


class NoTriton:
    \"\"\"Fails every import of triton, as on a machine where it is not installed.\"\"\"
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, NoTriton())
import torch
import kernels
from kernels import dispatch

gen = torch.Generator().manual_seed(5)
student, teacher = torch.randn(1, 3, 9, 11, generator=gen), torch.randn(1, 3, 9, 11, generator=gen)
pred, target = torch.rand(2, 9, 11, generator=gen) < 0.5, torch.rand(2, 9, 11, generator=gen) < 0.5
refused = []
for backend in ("triton", "interpret"):
    for call in (lambda: kernels.weighted_kd_loss(student, teacher, backend=backend),
                 lambda: kernels.boundary_metrics(pred, target, backend=backend)):
        try:
            call()
        except ValueError as error:
            refused.append(str(error))
print(json.dumps(dict(
    interpret_requested=dispatch.INTERPRET, triton_available=dispatch.triton_available(),
    triton_imported="triton" in sys.modules, refused=refused,
    loss={mode: kernels.weighted_kd_loss(student, teacher, weight=mode, temperature=2.0).item()
          for mode in kernels.WEIGHT_MODES},
    weight=kernels.kd_weight_map(student, teacher, "ssim").flatten().tolist(),
    boundary={k: v.tolist() for k, v in kernels.boundary_metrics(pred, target, spacing=(0.5, 1.3)).items()})))
"""


def test_kernels_import_and_run_their_torch_paths_without_triton():
    # the suite's TRITON_INTERPRET=1 stays set: the default backend must still fall back to torch
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["interpret_requested"] and not got["triton_available"] and not got["triton_imported"]
    assert len(got["refused"]) == 4 and all("needs triton" in message for message in got["refused"])
    # the same numbers as the torch paths here, where Triton is installed
    gen = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(1, 3, 9, 11, generator=gen), torch.randn(1, 3, 9, 11, generator=gen)
    pred, target = torch.rand(2, 9, 11, generator=gen) < 0.5, torch.rand(2, 9, 11, generator=gen) < 0.5
    assert got["loss"] == {mode: weighted_kd_loss(student, teacher, weight=mode, temperature=2.0, backend="torch").item()
                           for mode in WEIGHT_MODES}
    assert got["weight"] == kd_weight_map(student, teacher, "ssim", backend="torch").flatten().tolist()
    expected = kernels.boundary_metrics(pred, target, spacing=(0.5, 1.3), backend="torch")
    assert got["boundary"] == {k: v.tolist() for k, v in expected.items()}

