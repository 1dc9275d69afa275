"""Compile, in parallel and before they run, the kernels that some code is about to launch.

Triton compiles a kernel the first time it is launched with a new specialisation, one after
another on the launching thread, and triton 3.6 also builds each kernel's C launcher with gcc.
On a fresh machine (empty cache) that is minutes of one core. So:
1. `record_launches(fn)` runs `fn` with every `Launch` recorded instead of run (the host side, sizes and
   allocations included, runs as usual), and turns the launches into picklable specs: the
   kernel's module and name, each tensor argument as its dtype (a tensor's specialisation is
   its dtype and 16-byte alignment, which every fresh allocation has), scalars as they are;
2. `distinct(specs, target)` drops specs that compile to one binary (the compile key Triton
   would use: `compile_check.source` hashed, with the options);
3. `warm(specs, workers)` compiles them in worker processes (processes, not threads: Triton
   generates its IR in Python, under the GIL): with a device, each worker runs Triton's own
   `warmup` path, whose compile key is the launch's by construction, and builds the launcher,
   both into the on-disk cache the launching process reads; with an explicit `arch` (no device
   needed), `triton.compile` for that target, to count and time the work.
"""
import hashlib
import importlib
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from unittest import mock

import torch

from kernels.dispatch import Launch


@dataclass(frozen=True)
class Spec:
    module: str
    name: str
    grid: int
    args: tuple  # torch.dtype for a tensor, else the value
    constexprs: tuple
    options: tuple

    def launch(self) -> Launch:
        """The Launch, with 0-element meta tensors standing for the tensors."""
        kernel = getattr(importlib.import_module(self.module), self.name)
        args = tuple(torch.empty(0, dtype=a, device="meta") if isinstance(a, torch.dtype) else a for a in self.args)
        return Launch(kernel, self.grid, args, dict(self.constexprs), dict(self.options))


def _spec(launch: Launch) -> Spec:
    fn = getattr(launch.kernel, "fn", launch.kernel)  # the interpreter wraps the same function
    args = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in launch.args)
    return Spec(fn.__module__, fn.__name__, launch.grid, args, tuple(sorted(launch.constexprs.items())),
                tuple(sorted(launch.options.items())))


def record_launches(fn) -> list:
    """Specs of the launches `fn()` makes, in order, each once; none of them runs."""
    seen = {}
    with mock.patch.object(Launch, "__call__", lambda launch: seen.setdefault(_spec(launch))):
        fn()
    return list(seen)


def distinct(specs, arch=None) -> list:
    """One spec per binary: for `arch` (e.g. 90), else for the current device."""
    return _compilable_processes(_distinct, [(specs, arch)], 1)[0]


def _distinct(specs, arch):
    from triton.compiler import make_backend

    from .compile_check import source
    backend = make_backend(_target(arch))
    keyed = {}
    for spec in specs:
        keyed.setdefault((source(spec.launch(), backend).hash(), spec.options), spec)
    return list(keyed.values())


def _compilable_processes(fn, arg_tuples, workers):
    """[fn(*args) for args in arg_tuples] in `workers` processes whose kernels compile.

    Workers start by spawning (a forked CUDA context is unusable) with TRITON_INTERPRET unset,
    since under the interpreter a kernel is no longer a compilable function.
    """
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, *zip(*arg_tuples)))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _target(arch):
    if arch is None:
        from triton.runtime import driver
        return driver.active.get_current_target()
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


def _launcher_seconds(compiled):
    """(source hash, gcc seconds) of the kernel's C launcher where this triton builds one with
    gcc (3.6; later ones do not: (None, 0)). Built as Triton builds it, less the link to
    libcuda, which a machine without a GPU lacks."""
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime.build import _build
    if not hasattr(nvidia, "make_launcher"):
        return None, 0.0
    src = compiled.src
    constants = {(src.fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in src.constants.items()}
    code = nvidia.make_launcher(constants, dict(src.signature), getattr(compiled.metadata, "tensordesc_meta", None))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launcher.c")
        with open(path, "w") as f:
            f.write(code)
        start = time.perf_counter()
        _build("launcher", path, tmp, [nvidia.libdevice_dir], nvidia.include_dirs, [], [])
        return hashlib.sha256(code.encode()).hexdigest(), time.perf_counter() - start


def _compile_share(specs, arch):
    """Worker: compile each spec (and its launcher); (name, kernel seconds, launcher hash,
    launcher seconds) per spec."""
    import triton
    times = []
    for spec in specs:
        start = time.perf_counter()
        launch = spec.launch()
        if arch is None:
            from triton.runtime import driver
            kernel = launch.kernel.warmup(*launch.args, grid=(launch.grid,), **launch.options, **launch.constexprs)
            driver.active.launcher_cls(kernel.src, kernel.metadata)  # triton 3.6: gcc, into the cache
            times.append((spec.name, time.perf_counter() - start, None, 0.0))
        else:
            from triton.compiler import make_backend

            from .compile_check import source
            target = _target(arch)
            compiled = triton.compile(source(launch, make_backend(target)), target=target, options=launch.options)
            times.append((spec.name, time.perf_counter() - start, *_launcher_seconds(compiled)))
    return times


def warm(specs, workers: int, arch=None) -> dict:
    """Compile `specs` in `workers` processes; wall time and compile times per kernel (with a
    device, launchers included in the kernel's; for an arch, distinct launchers apart)."""
    start = time.perf_counter()
    shares = [specs[i::workers] for i in range(workers) if specs[i::workers]]
    results = _compilable_processes(_compile_share, [(share, arch) for share in shares], len(shares))
    per_kernel, launchers = {}, {}
    for name, seconds, launcher, launcher_s in (t for share in results for t in share):
        entry = per_kernel.setdefault(name, dict(count=0, compile_s=0.0))
        entry["count"] += 1
        entry["compile_s"] = round(entry["compile_s"] + seconds, 2)
        if launcher is not None:
            launchers[launcher] = launcher_s
    return dict(specialisations=len(specs), workers=len(shares), wall_s=round(time.perf_counter() - start, 2),
                kernel_serial_s=round(sum(e["compile_s"] for e in per_kernel.values()), 2), per_kernel=per_kernel,
                distinct_gcc_launchers=len(launchers), launcher_serial_s=round(sum(launchers.values()), 2))
