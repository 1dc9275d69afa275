"""Weight modes are a registry: a mode registered with one function works through the torch and
the interpreter backends, the latter with its reference weight map and a one-time note."""
import warnings

import pytest
import torch

import kernels
from kernels import kd_loss, kd_weight_map, weighted_kd_loss
from kernels.kd_reference import WEIGHT_MODES, kd_loss_reference, weight_mode

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


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
