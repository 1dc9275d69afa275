"""Which implementation a kernel call runs on.

- "triton": compiled Triton kernels, CUDA tensors only.
- "interpret": the same Triton kernels run by Triton's CPU interpreter. Triton decides this
  when a kernel is decorated, so TRITON_INTERPRET=1 must be set before `kernels` is imported.
- "torch": the readable reference (plain torch, scipy for boundary distances).

By default CUDA tensors take "triton", CPU tensors take "interpret" when the interpreter is
on and "torch" otherwise.
"""
import os

import torch

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # kernels must import on machines without triton
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ("triton", "interpret", "torch")


def resolve_backend(backend, tensor: torch.Tensor) -> str:
    """Return the backend to use for `tensor`, or raise ValueError naming what is wrong."""
    if backend is None:
        if tensor.is_cuda and HAVE_TRITON and not INTERPRET:
            return "triton"
        if not tensor.is_cuda and HAVE_TRITON and INTERPRET:
            return "interpret"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return backend
    if not HAVE_TRITON:
        raise ValueError(f"backend={backend!r} needs triton, which is not installed")
    if backend == "triton" and (not tensor.is_cuda or INTERPRET):
        raise ValueError("backend='triton' needs CUDA tensors and TRITON_INTERPRET unset")
    if backend == "interpret" and (tensor.is_cuda or not INTERPRET):
        raise ValueError("backend='interpret' needs CPU tensors and TRITON_INTERPRET=1 set "
                         "before `kernels` is imported")
    return backend
