"""Device binding without a GPU: two GPUs faked by patching torch.cuda. A run's device becomes the
current CUDA device before anything else uses CUDA (torchrun ranks take their local rank's); every
kernel launch enters its tensors' device and no launch bypasses that; a checkpoint's random state is
the run device's alone and resumes on another device as an uninterrupted run would go on;
--deterministic warns where torch has no deterministic kernel instead of stopping the run, and
switches cuDNN's autotune off."""
import contextlib
import warnings

import pytest
import torch
from triton.runtime.jit import KernelInterface

from engine.cli import select_device, training_backends
from engine.state import rng_state, seed_stage, set_rng_state
from kernels import boundary_metrics, kd_weight_map, weighted_kd_loss
from kernels.dispatch import Launch


class TwoGPUs:
    """torch.cuda as a machine with two GPUs shows it: the current device, and one random stream per
    device (CPU generators standing in), every call that touches them recorded in order."""

    def __init__(self, monkeypatch):
        self.current, self.calls = 0, []
        self.streams = [torch.Generator().manual_seed(100 + i) for i in range(2)]
        for name, fn in dict(is_available=lambda: True, device_count=lambda: 2, current_device=self.current_device,
                             set_device=self.set_device, device=self.device, get_rng_state=self.get_rng_state,
                             set_rng_state=self.set_rng_state).items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def index(self, device) -> int:
        return torch.device(device).index if torch.device(device).index is not None else self.current

    def current_device(self):
        self.calls.append(("current_device",))
        return self.current

    def set_device(self, device):
        self.calls.append(("set_device", self.index(device)))
        self.current = self.index(device)

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, self.index(device)
        self.calls.append(("enter", self.current))
        try:
            yield
        finally:
            self.current = before

    def get_rng_state(self, device="cuda"):
        self.calls.append(("get_rng_state", self.index(device)))
        return self.streams[self.index(device)].get_state()

    def set_rng_state(self, new_state, device="cuda"):
        self.calls.append(("set_rng_state", self.index(device)))
        self.streams[self.index(device)].set_state(new_state)


class OnDevice(torch.Tensor):
    """A CPU tensor that reports a device this machine lacks."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, device):
        tensor = torch.Tensor._make_subclass(cls, torch.zeros(1))
        tensor.place = torch.device(device)
        return tensor

    @property
    def device(self):
        return self.place


class Kernel:
    """Stands for a Triton kernel: `kernel[grid](*args)` records the current device."""

    def __init__(self, gpus):
        self.gpus, self.launched_on = gpus, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched_on.append(self.gpus.current)


def test_a_run_binds_its_gpu_before_anything_else_touches_cuda(monkeypatch):
    gpus = TwoGPUs(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    assert gpus.calls == [("set_device", 1)] and gpus.current == 1
    gpus.current, gpus.calls[:] = 0, []
    assert select_device("cuda") == torch.device("cuda", 0)       # "cuda" is named as the device it is
    assert gpus.calls == [("current_device",), ("set_device", 0)]
    gpus.calls[:] = []
    assert select_device("cpu") == torch.device("cpu") and gpus.calls == []


def test_under_torchrun_each_rank_takes_its_local_gpu(monkeypatch):
    gpus = TwoGPUs(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert select_device("auto") == torch.device("cuda", 1) and gpus.calls == [("set_device", 1)]


def test_a_launch_enters_the_device_of_its_tensors_and_leaves_it(monkeypatch):
    gpus = TwoGPUs(monkeypatch)
    kernel = Kernel(gpus)
    Launch(kernel, 1, (OnDevice("cuda:1"), 3, OnDevice("cuda:1")), {}, {})()
    assert kernel.launched_on == [1] and gpus.current == 0
    Launch(kernel, 1, (torch.zeros(1),), {}, {})()      # a CPU launch (the interpreter) leaves CUDA alone
    assert kernel.launched_on == [1, 0] and gpus.calls == [("enter", 1)]
    with pytest.raises(ValueError, match="tensors are on cuda:0, cuda:1; put them on one device"):
        Launch(kernel, 1, (OnDevice("cuda:1"), OnDevice("cuda:0")), {}, {})()


def test_every_kernel_launch_goes_through_launch(monkeypatch):
    """KD loss and gradient of every weight mode, the weight map and the boundary metrics: each
    kernel grid is entered inside Launch.__call__, where the device guard is."""
    inside, outside, depth = [], [], [0]
    launch, getitem = Launch.__call__, KernelInterface.__getitem__

    def guarded(self):
        depth[0] += 1
        try:
            launch(self)
        finally:
            depth[0] -= 1

    def entered(kernel, grid):
        (inside if depth[0] else outside).append(getattr(kernel, "fn", kernel).__name__)
        return getitem(kernel, grid)
    monkeypatch.setattr(Launch, "__call__", guarded)
    monkeypatch.setattr(KernelInterface, "__getitem__", entered)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(1, 2, 4, 8, generator=gen).requires_grad_()
    teacher = torch.randn(1, 2, 4, 8, generator=gen)
    for mode in ("none", "agree", "ssim"):
        weighted_kd_loss(student, teacher, weight=mode, window=3).backward()
        kd_weight_map(student, teacher, mode, window=3)
    masks = torch.rand(1, 8, 16, generator=gen) > 0.5
    boundary_metrics(masks, ~masks)
    assert outside == []
    assert {"kd_pixel_kernel", "kd_ssim_kernel", "_count_kernel", "_compact_kernel", "_nearest_kernel"} <= set(inside)


def test_a_checkpoint_holds_the_run_gpus_random_state_and_resumes_it_on_another(monkeypatch):
    """A run on cuda:1 saves that GPU's stream alone; resumed on cuda:0 (a machine with fewer GPUs,
    or another slot), that GPU's stream goes on exactly as cuda:1's would have."""
    gpus = TwoGPUs(monkeypatch)
    torch.randn(5, generator=gpus.streams[1])            # the run draws some numbers first
    saved = rng_state(torch.device("cuda", 1))
    assert gpus.calls == [("get_rng_state", 1)]
    uninterrupted = torch.randn(5, generator=gpus.streams[1])
    set_rng_state(saved, torch.device("cuda", 0))
    assert gpus.calls[-1] == ("set_rng_state", 0)
    assert torch.equal(torch.randn(5, generator=gpus.streams[0]), uninterrupted)
    gpus.calls[:] = []
    cpu_state = rng_state(torch.device("cpu"))
    set_rng_state(cpu_state, torch.device("cpu"))
    assert "cuda" not in cpu_state and gpus.calls == []


@pytest.fixture
def global_numerics():
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark = saved[1]


def test_deterministic_warns_where_torch_has_no_deterministic_kernel(global_numerics):
    seed_stage(0, "teacher", deterministic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))    # no deterministic kernel anywhere
    assert any("does not have a deterministic implementation" in str(w.message) for w in caught)
    seed_stage(0, "teacher", deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_cudnn_autotune_is_on_for_training_on_cuda_unless_deterministic(global_numerics):
    torch.backends.cudnn.benchmark = False
    training_backends(torch.device("cpu"), deterministic=False)
    assert not torch.backends.cudnn.benchmark
    training_backends(torch.device("cuda", 0), deterministic=False)
    assert torch.backends.cudnn.benchmark
    training_backends(torch.device("cuda", 0), deterministic=True)
    assert not torch.backends.cudnn.benchmark
