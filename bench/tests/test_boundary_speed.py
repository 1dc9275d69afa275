"""bench.boundary_speed's gate: a NaN against a finite value is a mismatch, not a match."""
import torch

from bench.boundary_speed import largest_difference
from kernels.boundary import METRICS


def test_benchmark_gate_counts_nan_against_finite_as_a_mismatch():
    finite = {k: torch.tensor([1.0, 2.0], dtype=torch.float64) for k in METRICS}
    one_nan = {k: torch.tensor([1.0, float("nan")], dtype=torch.float64) for k in METRICS}
    assert largest_difference(finite, one_nan) == float("inf")
    assert largest_difference(one_nan, one_nan) == 0.0
    shifted = {k: v + 0.25 for k, v in finite.items()}
    assert largest_difference(finite, shifted) == 0.25
