"""Fused weighted knowledge-distillation loss and exact boundary metrics (SPEC section 8).

Each op is two files: `kd_loss.py` and `boundary.py` hold its API, its readable math and the
path that runs without Triton; `kd_triton.py` and `boundary_triton.py` its Triton code, imported
only by a call that runs it. `dispatch.py` says which path runs. `WEIGHT_MODES` is the live
registry of weight modes (name -> function of the readable math); its names are the valid
`weight=` strings.
"""
from .boundary import boundary_metrics
from .dispatch import resolve_backend
from .kd_loss import WEIGHT_MODES, kd_weight_map, weighted_kd_loss

__all__ = ["weighted_kd_loss", "kd_weight_map", "boundary_metrics", "WEIGHT_MODES", "resolve_backend"]
