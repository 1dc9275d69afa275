"""Weighted KD loss: Triton kernels (via the interpreter) against the float64 reference, and the
reference against independent oracles (a numpy window loop, F.kl_div)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels.kd_loss import kd_weight_map, weighted_kd_loss
from kernels.kd_reference import kd_loss_reference, weight_map_reference

# The interpreter evaluates masked-off lanes too (0/0 outside the image, log2(0)); numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SHAPES = [(2, 2, 33, 47), (1, 3, 16, 64), (1, 8, 5, 9)]
# The ssim kernel walks down the rows one at a time: in the interpreter its cost grows with the
# rows, so it gets shorter images (several strips, chunks and windows are covered in
# test_kernel_ssim_geometry.py).
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


def test_default_backend_on_cpu_is_interpreter():
    student, teacher = logits((1, 2, 5, 6), seed=13)
    torch.testing.assert_close(weighted_kd_loss(student, teacher),
                               weighted_kd_loss(student, teacher, backend="interpret"))


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
    fg = lambda z: 1 - (z / map_t).softmax(1)[0, 0].numpy()  # noqa: E731  "not background"
    expected = numpy_ssim_weight(fg(teacher), fg(student), window, gamma)
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
