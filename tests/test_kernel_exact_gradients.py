"""Half-precision gradients rounded once: under a loss scale, where w_i / Z underflows float16,
the Triton gradient (interpreter) is the float64 oracle's gradient rounded to the input dtype.

The oracle takes the kernel's own float32 weight map: how exactly a weight is computed is the
weight tests' business (an ssim weight is good to ~1e-4); here the question is whether the
gradient t * w * (pS - pT) * grad_output / Z reaches the input dtype intact."""
import pytest
import torch

from kernels import kd_weight_map, weighted_kd_loss
from kernels.kd_reference import kd_loss_reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
LOSS_SCALE = 65536.0
SHAPE = (1, 3, 6, 10)


def half_ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """Half the spacing of `dtype` at |x|, subnormals included."""
    info = torch.finfo(dtype)
    magnitude = x.abs().clamp(min=info.smallest_normal)
    return 0.5 * info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))


def inputs(dtype, weight_kind, shape=SHAPE, memory_format=torch.contiguous_format):
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


@pytest.mark.parametrize("shape,memory_format", [(SHAPE, torch.contiguous_format), ((1, 2, 6, 10), torch.channels_last)],
                         ids=["C=3", "C=2-channels-last"])  # the general path; the two-class one
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_kind,reduction", [("heavy", "weighted_mean"), ("none", "mean"),
                                                   ("agree", "weighted_mean"), ("ssim", "weighted_mean")])
def test_scaled_gradient_is_the_oracle_rounded_once(dtype, weight_kind, reduction, shape, memory_format):
    student, teacher, weight = inputs(dtype, weight_kind, shape, memory_format)
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
    # truncation whatever the rounding mode (a GPU rounds to nearest, which kernels/gpu_check.py
    # checks at half an ulp): a whole ulp for bfloat16 here.
    rounding = 2 if dtype == torch.bfloat16 else 1
    factor = (LOSS_SCALE * 2.0 * w64 / z)[:, None]
    allowed = rounding * half_ulp(expected, dtype) + 8 * torch.finfo(torch.float32).eps * factor
    bad = error > allowed
    assert not bool(bad.any()), f"{int(bad.sum())} of {error.numel()} off: {s.grad[bad][:3]} vs {expected[bad][:3]}"
    assert torch.count_nonzero(s.grad) == torch.count_nonzero(expected.to(dtype))
