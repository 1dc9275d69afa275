"""What the GPU check's cold cache costs: its kernel specialisations, counted and compiled for
one architecture in parallel on this machine, without a GPU.

    python -m bench.gpu_check_compile --arch 90 --workers 2 --out bench/gpu_check_compile_sm90.json

The launches are recorded from the check's own steps at its full sizes (on CPU tensors, through
the interpreter, none of them run), reduced to distinct binaries as Triton keys them, and compiled
by `bench.precompile.warm` with `triton.compile` for the target; under triton 3.6 the gcc
builds of the distinct C launchers are timed too. The JSON holds the arithmetic that scales the
serial compile time to a 16-core host.
"""
import argparse
import json
import os
import tempfile

HOST_CORES = 16


def main():
    # The recording runs the host code on CPU tensors, through the interpreter; set here, not at
    # import, since the compiling workers import this module again and must not interpret.
    os.environ["TRITON_INTERPRET"] = "1"
    # a cold cache, as on a fresh machine: the workers inherit it
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu-check-compile-")
    import torch
    import triton

    from bench.check_rows import machine
    from bench.gpu_check import SIZES, every_launch
    from bench.precompile import distinct, record_launches, warm
    from engine.records import write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    recorded = record_launches(lambda: every_launch(SIZES["full"], torch.device("cpu"), on_gpu=True))
    specs = distinct(recorded, args.arch)
    cost = warm(specs, args.workers, args.arch)
    serial = cost["kernel_serial_s"] + cost["launcher_serial_s"]
    longest = max(e["compile_s"] / e["count"] for e in cost["per_kernel"].values())
    report = dict(arch=f"sm_{args.arch}", triton=triton.__version__, torch=torch.__version__, **machine(),
                  recorded_launches=len(recorded), **cost,
                  arithmetic=(f"{HOST_CORES} cores: ({cost['kernel_serial_s']} s kernels + "
                              f"{cost['launcher_serial_s']} s launchers) / {HOST_CORES} = "
                              f"{serial / HOST_CORES:.1f} s, at least the longest kernel's mean "
                              f"{longest:.1f} s; measured here: {cost['wall_s']} s on {cost['workers']} workers"))
    write_text(args.out, json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
