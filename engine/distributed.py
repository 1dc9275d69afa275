"""Data parallelism under torchrun: one process per device, DistributedDataParallel, rank 0 writes.

    torchrun --nproc-per-node N train_teacher.py ...     (likewise the refiner and the student)

`--batch-size` stays per process, so the global batch is N times it. Every rank draws the whole
global batch of a step from (seed, step), indices and augmentation alike, and keeps its own
share, so N processes with batch b see exactly the images, in the same augmentation, that one
process with batch N*b sees. BatchNorm statistics are synchronised over the global batch. Only
rank 0 validates, logs and writes the (atomic) checkpoint; every rank reads it on --resume.
Without torchrun nothing of this is active.
"""
import atexit
import dataclasses
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


@dataclasses.dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch."""
        if self.world == 1:
            return batch
        size = batch.shape[0] // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable sum of `x` over the ranks (`x` itself when alone)."""
        return dist_nn.all_reduce(x) if self.world > 1 else x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch of which `x` is this rank's share (no gradient)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` with synchronised BatchNorm inside DistributedDataParallel (itself when alone)."""
        if self.world == 1:
            return module
        return DistributedDataParallel(synchronise_batchnorm(module))


def join(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in the environment, if any, on `device`, which
    `engine.cli.select_device` has made the GPU of this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    return Distributed(dist.get_rank(), world), device


class SynchronisedBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch of all ranks.

    torch's own SyncBatchNorm runs on GPUs only; this one sums the per-channel count, sum and sum
    of squares with one differentiable all-reduce, on any backend, so it also serves the CPU
    (gloo) runs the tests use. Same parameters and buffers as BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        xf = x.float()
        count = torch.full((1,), xf.numel() / xf.shape[1], device=x.device)
        moments = dist_nn.all_reduce(torch.cat([count, xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3))]))
        n, c = moments[0], x.shape[1]
        mean = moments[1:1 + c] / n
        var = moments[1 + c:] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        out = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        return (out * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


def synchronise_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d of `module` (in place) by SynchronisedBatchNorm with its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SynchronisedBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats).to(child.weight.device)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            synchronise_batchnorm(child)
    return module
