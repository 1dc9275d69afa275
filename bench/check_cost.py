"""What the dataset check costs.

    python -m bench.check_cost DIR [DIR ...] --out bench/check_cpu.json
    python -m bench.check_cost --synthetic scratch/clinic --out bench/check_cpu.json

Times data.check.check_folder, which the teacher runs: every image and mask decoded and checked
on all cores, and the fingerprint that later stages compute instead. `--synthetic DIR` first
writes a clinic-sized folder there (2,500 radiographs of 2900x1400, 8-bit PNG, 10 % with masks)
if DIR does not exist yet: a hundred distinct images, each saved under 25 names, since decoding
costs the same for every copy and encoding 2,500 PNGs would take an hour. One run per folder:
the first decode reads the files from the disk cache or the disk, as a first stage does.
"""
import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from data.synthetic import panorama, write_case
from data.check import check_folder, fingerprint
from data.classes import dataset_classes
from engine.records import write_text


def write_synthetic(root: Path, n=2500, distinct=100, size=(1400, 2900), masked_every=10, seed=0):
    """`n` 8-bit panoramas, `distinct` of them different, and a mask for every `masked_every`-th."""
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    (staging / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for k in range(distinct):
        image, mask = panorama(rng, size)
        write_case(staging, f"case_{k:04d}", image)
        for i in range(k, n, distinct):
            if i != k:
                shutil.copyfile(staging / "images" / f"case_{k:04d}.png", staging / "images" / f"case_{i:04d}.png")
            if i % masked_every == 0:
                iio.imwrite(staging / "masks" / f"case_{i:04d}.png", mask.astype(np.uint8) * np.uint8(255))
    staging.rename(root)


def measure(root: Path) -> dict:
    classes = dataset_classes(root)
    start = time.perf_counter()
    summary = check_folder(root, classes)
    check_s = time.perf_counter() - start
    start = time.perf_counter()
    fingerprint(root)
    fingerprint_s = time.perf_counter() - start
    files = [p for sub in ("images", "masks") if (root / sub).is_dir() for p in (root / sub).iterdir()]
    return dict(folder=root.name, cases=summary["cases"], masks=summary["masks"], sizes=dict(summary["sizes"]),
                bits={str(k): v for k, v in summary["bits"].items()}, megabytes=sum(p.stat().st_size for p in files) / 1e6,
                check_s=round(check_s, 2), check_ms_per_case=round(1000 * check_s / summary["cases"], 1),
                fingerprint_s=round(fingerprint_s, 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="*", type=Path, help="dataset folders to check")
    ap.add_argument("--synthetic", type=Path, help="also time this synthetic clinic folder (written if missing)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args()
    folders = list(args.folders)
    if args.synthetic:
        if not args.synthetic.exists():
            start = time.perf_counter()
            write_synthetic(args.synthetic)
            print(f"wrote {args.synthetic} in {time.perf_counter() - start:.0f} s")
        folders.append(args.synthetic)
    machine = dict(cpu=platform.processor() or platform.machine(), cores=len(os.sched_getaffinity(0)),
                   load_average_before=os.getloadavg()[0])
    results = []
    for folder in folders:
        results.append(measure(folder))
        print(json.dumps(results[-1]))
    machine["load_average_after"] = os.getloadavg()[0]
    write_text(args.out, json.dumps(dict(machine=machine, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
