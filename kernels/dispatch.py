"""Which implementation an op call runs on, and one kernel launch as a value; shared by both ops.

- "triton": compiled Triton kernels, CUDA tensors only.
- "interpret": the same Triton kernels run by Triton's CPU interpreter. Triton decides this
  when a kernel is decorated, so TRITON_INTERPRET=1 must be set before `kernels` is imported.
- "torch": the readable path (plain torch; numpy and scipy for boundary distances).

By default CUDA tensors take "triton", CPU tensors take "interpret" when the interpreter is
on and "torch" otherwise. Triton is optional (it ships Linux wheels only): it is imported only
when a call could take one of its backends, so the torch path runs where it is not installed.
"""
import contextlib
import functools
import os
from dataclasses import dataclass

import torch

BACKENDS = ("triton", "interpret", "torch")


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks Triton to interpret the kernels it decorates from now on."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = interpreter_requested()


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here; asked only where a Triton backend could run."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend, tensor: torch.Tensor) -> str:
    """Return the backend to use for `tensor`, or raise ValueError naming what is wrong."""
    if backend is None:
        if tensor.is_cuda and not INTERPRET and triton_available():
            return "triton"
        if not tensor.is_cuda and INTERPRET and triton_available():
            return "interpret"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return backend
    if not triton_available():
        raise ValueError(f"backend={backend!r} needs triton, which is not installed")
    if backend == "triton" and (not tensor.is_cuda or INTERPRET):
        raise ValueError("backend='triton' needs CUDA tensors and TRITON_INTERPRET unset")
    if backend == "interpret" and (tensor.is_cuda or not INTERPRET):
        raise ValueError("backend='interpret' needs CPU tensors and TRITON_INTERPRET=1 set "
                         "before `kernels` is imported")
    return backend


@dataclass(frozen=True)
class Launch:
    """Kernel, one-dimensional grid, arguments, meta-parameters and compile options: what the
    host side decided, runnable and compilable alike.

    `bench.compile_check` compiles exactly these for sm_90/sm_80; calling one launches it on the
    device of its tensors.
    """
    kernel: object
    grid: int
    args: tuple
    constexprs: dict
    options: dict  # compile options: num_warps, and a register ceiling where ptxas needs one
    parts: torch.Tensor = None  # (2, grid) partial sums of w*KL and w, KD loss phases only

    @property
    def device(self) -> torch.device:
        """The one device of the tensor arguments."""
        devices = {a.device for a in self.args if isinstance(a, torch.Tensor)}
        if len(devices) != 1:
            name = getattr(getattr(self.kernel, "fn", self.kernel), "__name__", "kernel")
            raise ValueError(f"{name}: its tensors are on "
                             f"{', '.join(sorted(map(str, devices))) or 'no device'}; put them on one device")
        return devices.pop()

    def __call__(self):
        # Triton launches on the current CUDA device, whatever its tensors' device: on another GPU
        # that is an illegal address, so the launch enters theirs
        device = self.device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.kernel[(self.grid,)](*self.args, **self.options, **self.constexprs)
