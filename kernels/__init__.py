"""Fused weighted knowledge-distillation loss and GPU boundary metrics (SPEC section 8).

Each kernel has a plain-torch/scipy reference beside it; `backend.py` says which one runs.
`WEIGHT_MODES` is the live registry of weight modes (name -> reference function); its names are
the valid `weight=` strings.
"""
from .backend import resolve_backend
from .boundary import boundary_metrics
from .kd_loss import kd_weight_map, weighted_kd_loss
from .kd_reference import WEIGHT_MODES

__all__ = ["weighted_kd_loss", "kd_weight_map", "boundary_metrics", "WEIGHT_MODES", "resolve_backend"]
