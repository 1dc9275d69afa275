"""One kernel launch as a value: what the host side decided, runnable and compilable alike."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Launch:
    """Kernel, one-dimensional grid, arguments, meta-parameters and compile options.

    `bench.compile_check` compiles exactly these for sm_90/sm_80; calling one launches it.
    """
    kernel: object
    grid: int
    args: tuple
    constexprs: dict
    options: dict  # compile options: num_warps, and a register ceiling where ptxas needs one
    parts: torch.Tensor = None  # (2, grid) partial sums of w*KL and w, KD loss phases only

    def __call__(self):
        self.kernel[(self.grid,)](*self.args, **self.options, **self.constexprs)
