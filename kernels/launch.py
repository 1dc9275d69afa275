"""One kernel launch as a value: what the host side decided, runnable and compilable alike."""
import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Launch:
    """Kernel, one-dimensional grid, arguments, meta-parameters and compile options.

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
