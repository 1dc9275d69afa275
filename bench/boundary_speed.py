"""Benchmark of the boundary metrics on sinus-like masks (SPEC section 8); a script, never a test.

    python -m bench.boundary_speed --out bench/boundary_<device>.json

A batch of 32 prediction/ground-truth pairs of 1024 x 2048: two lobes per image (x ~ 0.20-0.42
and 0.58-0.80, y ~ 0.10-0.45, 2-5 % of the image each), the prediction a perturbed copy of the
ground truth. On CUDA it first checks the Triton path against the CPU reference (a NaN against a
finite value fails the check), then times the whole batch on the GPU (per image: the batch time
over 32, labelled amortised) and each case alone (single), the CPU path per image, and MedPy and
MONAI (hd95 + assd) on a few images. Without CUDA it times the CPU path, MedPy and MONAI only,
and the JSON says so.
"""
import argparse
import importlib
import json
import os
import statistics
import time

import numpy as np
import scipy
import torch
import triton

from bench.check_rows import machine
from engine.records import write_text
from kernels import boundary_metrics
from kernels.boundary import METRICS

BATCH, HEIGHT, WIDTH = 32, 1024, 2048
SPACING = (0.1, 0.1)
LOBE_COLUMNS = ((0.20, 0.42), (0.58, 0.80))
LOBE_ROWS = (0.10, 0.45)


def _lobe(mask, centre, semi_axes, harmonics):
    """Paint a star-shaped lobe: an ellipse whose radius is modulated by a few cosine harmonics."""
    reach = 1.0 + sum(abs(a) for a, _ in harmonics)
    (cy, cx), (b, a) = centre, semi_axes
    y0, y1 = max(int(cy - b * reach), 0), min(int(cy + b * reach) + 2, mask.shape[0])
    x0, x1 = max(int(cx - a * reach), 0), min(int(cx + a * reach) + 2, mask.shape[1])
    yy, xx = np.mgrid[y0:y1, x0:x1]
    u, v = (xx - cx) / a, (yy - cy) / b
    angle = np.arctan2(v, u)
    radius = 1.0 + sum(amp * np.cos(k * angle + phase) for k, (amp, phase) in enumerate(harmonics, start=2))
    mask[y0:y1, x0:x1] |= np.hypot(u, v) <= radius


def sinus_pair(rng, height=HEIGHT, width=WIDTH):
    """(prediction, ground truth) bool masks of one sinus-like case."""
    truth = np.zeros((height, width), dtype=bool)
    pred = np.zeros_like(truth)
    for columns in LOBE_COLUMNS:
        half_w = (columns[1] - columns[0]) / 2 * width
        half_h = (LOBE_ROWS[1] - LOBE_ROWS[0]) / 2 * height
        centre = (sum(LOBE_ROWS) / 2 * height, sum(columns) / 2 * width)
        axes = (half_h * rng.uniform(0.6, 0.9), half_w * rng.uniform(0.6, 0.9))  # 2-5 % of the image
        harmonics = [(rng.uniform(0.0, 0.06), rng.uniform(0, 2 * np.pi)) for _ in range(4)]
        _lobe(truth, centre, axes, harmonics)
        # the prediction: shifted, rescaled and with a wobblier outline
        shift = rng.normal(0.0, 0.01, 2) * (height, width)
        pred_axes = tuple(s * rng.uniform(0.95, 1.05) for s in axes)
        pred_harmonics = [(a + rng.normal(0, 0.01), p + rng.normal(0, 0.2)) for a, p in harmonics]
        pred_harmonics.append((rng.uniform(0.0, 0.01), rng.uniform(0, 2 * np.pi)))
        _lobe(pred, (centre[0] + shift[0], centre[1] + shift[1]), pred_axes, pred_harmonics)
    if rng.random() < 0.5:  # a small false positive near a lobe, as networks make
        _lobe(pred, (rng.uniform(0.05, 0.5) * height, rng.uniform(0.15, 0.85) * width), (8.0, 12.0), [])
    return pred, truth


def _summary(times_ms):
    """Median and spread (25th-75th percentile, min, max) of a list of times in ms."""
    q25, q75 = np.percentile(times_ms, [25, 75])
    return dict(median_ms=statistics.median(times_ms), p25_ms=float(q25), p75_ms=float(q75),
                min_ms=min(times_ms), max_ms=max(times_ms), n=len(times_ms))


def time_cpu_path(pred, truth, repeats):
    """Per-image times of the CPU reference, each image timed `repeats` times."""
    times = []
    for _ in range(repeats):
        for p, g in zip(pred, truth):
            start = time.perf_counter()
            boundary_metrics(p, g, spacing=SPACING, backend="torch")
            times.append((time.perf_counter() - start) * 1e3)
    return _summary(times)


def _medpy_case(p, g):
    from medpy.metric import binary
    return dict(hd95_pooled=binary.hd95(p, g, SPACING, 1), assd=binary.assd(p, g, SPACING, 1))


def _monai_case(p, g):
    """MONAI's HD95 and ASSD on the CPU, as a training loop would call them."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    p, g = torch.from_numpy(p)[None, None].float(), torch.from_numpy(g)[None, None].float()
    return dict(hd95=float(compute_hausdorff_distance(p, g, percentile=95, spacing=list(SPACING))),
                assd=float(compute_average_surface_distance(p, g, symmetric=True, spacing=list(SPACING))))


LIBRARIES = (("medpy", "medpy.metric", _medpy_case), ("monai", "monai.metrics", _monai_case))


def _median_ms(call, repeats):
    """Median time in ms of `repeats` calls, and the last call's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def side_by_side(pred, truth, n_images, repeats):
    """Per-image times of our CPU path, MedPy's and MONAI's hd95 + assd, each the median of
    `repeats` calls of one image, taken image after image in turn, so that every library is timed
    alike and a busy machine slows all of them alike; with each library's largest difference to
    our values in its convention. A library that is not importable (never installed on a bare GPU
    machine) is recorded as absent."""
    libraries, out = [], {}
    for name, module, case in LIBRARIES:
        try:
            importlib.import_module(module)
            libraries.append((name, case))
        except ImportError as error:
            out[name] = dict(absent=True, reason=f"{type(error).__name__}: {error}")
    times = {name: [] for name in ["cpu_path"] + [name for name, _ in libraries]}
    worst = {name: 0.0 for name, _ in libraries}
    for p, g in zip(pred[:n_images].numpy(), truth[:n_images].numpy()):
        p_tensor, g_tensor = torch.from_numpy(p), torch.from_numpy(g)
        ms, _ = _median_ms(lambda: boundary_metrics(p_tensor, g_tensor, spacing=SPACING, backend="torch"), repeats)
        times["cpu_path"].append(ms)
        for name, case in libraries:
            ms, theirs = _median_ms(lambda: case(p, g), repeats)
            times[name].append(ms)
            mine = boundary_metrics(p_tensor, g_tensor, spacing=SPACING, backend="torch")
            worst[name] = max(worst[name], *(abs(theirs[k] - float(mine[k])) for k in theirs))
    out["cpu_path"] = _summary(times["cpu_path"])
    for name, _ in libraries:
        out[name] = dict(_summary(times[name]), max_abs_difference_to_cpu_path=worst[name])
    return out


def _gpu_call_ms(pred, truth) -> float:
    """One call of the Triton path, CUDA events around it, the device idle before."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    boundary_metrics(pred, truth, spacing=SPACING)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_gpu_single(pred, truth, repeats=3):
    """Per-case times of the Triton path called with one case at a time (not amortised)."""
    _gpu_call_ms(pred[0], truth[0])  # warm-up: compile for the (H, W) call
    return _summary([_gpu_call_ms(p, g) for p, g in zip(pred, truth) for _ in range(repeats)])


def time_gpu_batch(pred, truth, repeats, warmup=3):
    """Times of the Triton path on the whole batch."""
    for _ in range(warmup):
        _gpu_call_ms(pred, truth)
    return _summary([_gpu_call_ms(pred, truth) for _ in range(repeats)])


def largest_difference(a: dict, b: dict) -> float:
    """Largest |a - b| over the metrics; inf where one side is NaN and the other is not."""
    worst = 0.0
    for k in METRICS:
        if not torch.equal(a[k].isnan(), b[k].isnan()):
            return float("inf")
        both = ~a[k].isnan()
        if both.any():
            worst = max(worst, float((a[k][both] - b[k][both]).abs().max()))
    return worst


def sinus_batch(batch=BATCH, height=HEIGHT, width=WIDTH, seed=0):
    """(prediction, ground truth) bool tensors (batch, height, width) of sinus-like cases."""
    rng = np.random.default_rng(seed)
    pairs = [sinus_pair(rng, height, width) for _ in range(batch)]
    return torch.from_numpy(np.stack([p for p, _ in pairs])), torch.from_numpy(np.stack([g for _, g in pairs]))


def gpu_timings(pred, truth, repeats):
    """The Triton path on CUDA: its gate against the CPU path (AssertionError beyond 1e-3, or a
    NaN against a finite value), then batch and single-case times."""
    pred_gpu, truth_gpu = pred.to("cuda"), truth.to("cuda")
    out = dict(device=torch.cuda.get_device_name())
    out["max_abs_difference_to_cpu_path"] = largest_difference(
        boundary_metrics(pred_gpu, truth_gpu, spacing=SPACING),
        boundary_metrics(pred, truth, spacing=SPACING, backend="torch"))
    if out["max_abs_difference_to_cpu_path"] > 1e-3:
        raise AssertionError(f"Triton path disagrees with the CPU reference by "
                             f"{out['max_abs_difference_to_cpu_path']:.3g}: not timing it")
    batch = time_gpu_batch(pred_gpu, truth_gpu, repeats)
    out["batch"] = batch
    out["per_image_ms_amortised_over_batch"] = batch["median_ms"] / len(pred)
    out["per_image_single_case"] = time_gpu_single(pred_gpu, truth_gpu)
    out["input_bytes_per_second"] = 2 * pred.numel() / (batch["median_ms"] * 1e-3)
    return out


def ratios(compared, gpu=None):
    """Each library's median over ours (`side_by_side`'s CPU path, and the Triton path where
    timed), with the arithmetic written out."""
    out, arithmetic = {}, []
    ours = [("cpu_path", compared["cpu_path"]["median_ms"])]
    if gpu:
        ours.append(("triton", gpu["per_image_ms_amortised_over_batch"]))
    for name, summary in compared.items():
        if name == "cpu_path" or "median_ms" not in summary:
            continue
        for label, ms in ours:
            out[f"{name}_over_{label}"] = summary["median_ms"] / ms
            arithmetic.append(f"{name}_over_{label} = {summary['median_ms']:.4g} ms / {ms:.4g} ms "
                              f"= {out[f'{name}_over_{label}']:.4g}")
    return out, arithmetic


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write, e.g. bench/boundary_h100.json")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions of the GPU batch")
    parser.add_argument("--cpu-repeats", type=int, default=3,
                        help="timed passes of the CPU path over the batch, and calls per image of each library side by side")
    parser.add_argument("--medpy-images", type=int, default=4,
                        help="images timed side by side with MedPy (~0.5 s a call) and MONAI")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the CPU path and MONAI on one thread each, as the comparison states

    pred, truth = sinus_batch()
    foreground = truth.flatten(1).float().mean(1)
    report = dict(shape=[BATCH, HEIGHT, WIDTH], spacing=SPACING, **machine(), torch_threads=torch.get_num_threads(),
                  truth_foreground_fraction=dict(min=float(foreground.min()), max=float(foreground.max())),
                  versions=dict(torch=torch.__version__, triton=triton.__version__, scipy=scipy.__version__,
                                numpy=np.__version__))
    report["cpu_path_per_image"] = time_cpu_path(pred, truth, args.cpu_repeats)
    gpu = gpu_timings(pred, truth, args.repeats) if torch.cuda.is_available() else None
    if gpu:
        report["triton"] = gpu
    else:
        report["note"] = ("no CUDA device: the CPU path, MedPy and MONAI only, no Triton timing; the 1-minute load "
                          "average is recorded: on a shared machine compare the ratios in side_by_side, where each "
                          "image is timed by all three in turn")
    report["side_by_side"] = side_by_side(pred, truth, args.medpy_images, args.cpu_repeats)
    report["ratios"], report["arithmetic"] = ratios(report["side_by_side"], gpu)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
