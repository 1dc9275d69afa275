"""Procedural panoramic radiograph phantom with exact maxillary-sinus masks (SPEC section 1.1).

The picture is built like an X-ray: every anatomical structure (data.anatomy, data.sinus) adds
a smooth attenuation layer to a canvas (data.shapes), and the acquisition (blur, quantum noise,
gamma, contrast, vignetting) is applied to the sum. This file renders cases, writes them as a
dataset folder, and draws the contact sheet. Besides the hard-to-see sinuses, frequent
positioning errors and a share of poorly exposed (flat, noisy, blurred) images make it hard.

    python -m data.phantom --out DIR --n N --size H W --seed S [--classes 2]
    python -m data.phantom --grid docs/phantom_grid.png
"""
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from errors import OneLineParser, UserError, exit_on_user_error
from kernels.boundary import mask_boundary

from .anatomy import ANATOMY, Patient
from .shapes import Canvas
from .sinus import SINUS

FORMAT_VERSION = 3     # bump when the generator changes what a seed draws
SIXTEEN_BIT_EVERY = 10  # every 10th case is written as a 16-bit PNG to exercise that decode path
GRID_SIZE = (160, 320)  # cells of the contact sheet: small enough to keep docs/ light
STAGING = ".phantom-partial"  # generate() renders here, then moves the finished dataset into place
SIDE_CLASSES = {"1": "left sinus", "2": "right sinus"}   # --classes 2, as seen in the image
SIDES_MASK = "1 = the sinus on the image's left, 2 = the one on its right (classes.json)"

ACQUISITION = dict(blur_heights=(0.0015, 0.004), noise=(0.025, 0.06), gamma=(0.6, 1.6),
                   contrast=(0.8, 1.2), vignetting=(0.1, 0.4), p_positioning_error=0.4,
                   p_poor_exposure=0.35, poor_blur_heights=(0.003, 0.007), poor_noise=(0.05, 0.09),
                   poor_contrast=(0.55, 0.8))


# ---------------------------------------------------------------------------------------------
# acquisition and the public entry points

def acquire(att, rng, noise_rng, U, V):
    """Detector response: blur, quantum noise, vignetting, gamma and contrast -> [0, 1]."""
    H = att.shape[0]
    a = ACQUISITION
    poor = rng.random() < a["p_poor_exposure"]     # underexposed, motion-blurred, flat
    blur, noise, contrast = ("poor_blur_heights", "poor_noise", "poor_contrast") if poor \
        else ("blur_heights", "noise", "contrast")
    img = ndimage.gaussian_filter(att, rng.uniform(*a[blur]) * H)
    img = img * (1 - rng.uniform(*a["vignetting"]) * ((U - 0.5) ** 2 * 1.5 + (V - 0.5) ** 2))
    img = np.clip(img / np.percentile(img, 99.8), 0, None) ** rng.uniform(*a["gamma"])  # auto-exposure
    img = (img - 0.3) * rng.uniform(*a[contrast]) + 0.3 + rng.normal(0, 0.04)
    sigma = rng.uniform(*a[noise])
    noise = noise_rng.standard_normal(att.shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, 0.6) * 1.8      # slightly correlated detector noise
    img = img + sigma * np.sqrt(np.clip(img, 0.02, 1.0)) * noise
    return np.clip(img, 0.0, 1.0)


def render_float(seed, size, sides=False):
    """The radiograph as float32 in [0, 1] and the uint8 mask, for case seed `seed`: {0, 1}, the union of
    both lobes, or with `sides` 1 for the sinus on the image's left and 2 for the one on its right."""
    rng = np.random.default_rng(seed)
    positioning = rng.random() < ACQUISITION["p_positioning_error"]
    tilt = np.clip(rng.normal(0, 2.5 if positioning else 0.8), -5.0, 5.0)
    magnification = rng.uniform(0.92, 1.08) if positioning else rng.uniform(0.97, 1.03)
    # a head placed too high or low in the chin rest moves the whole face vertically
    shift = (rng.normal(0, 0.02), np.clip(rng.normal(0, 0.025 if positioning else 0.012), -0.035, 0.035))
    cv = Canvas(size, tilt, magnification, shift)
    patient = Patient(rng)
    for structure in ANATOMY:
        structure(cv, patient)
    # per-pixel noise has its own stream so the anatomy a seed draws is the same at every size
    image = acquire(cv.att, rng, np.random.default_rng([seed, 1]), cv.U, cv.V)
    return image.astype(np.float32), cv.mask if sides else (cv.mask > 0).astype(np.uint8)


def render_case(seed, size=(256, 512)):
    """(image uint8 (H, W), mask uint8 {0, 1} (H, W)) of the phantom patient `seed`."""
    image, mask = render_float(seed, size)
    return np.round(image * 255).astype(np.uint8), mask


def case_seed(seed, index):
    """Seed of case `index` of the dataset generated with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def case_id(index):
    return f"case_{index:04d}"


def _write_case(job):
    staging, seed, index, size, sides = job
    image, mask = render_float(case_seed(seed, index), size, sides)
    if index % SIXTEEN_BIT_EVERY == SIXTEEN_BIT_EVERY - 1:
        image = np.round(image * 65535).astype(np.uint16)
    else:
        image = np.round(image * 255).astype(np.uint8)
    iio.imwrite(staging / "images" / f"{case_id(index)}.png", image)
    iio.imwrite(staging / "masks" / f"{case_id(index)}.png", mask if sides else mask * np.uint8(255))


def is_interrupted_phantom(out_dir):
    """True if `out_dir` holds only what an interrupted generate() leaves behind (no images/)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or (out_dir / "images").exists():
        return False
    leftovers = {STAGING, "masks", "phantom.json", "classes.json"}
    names = {p.name for p in out_dir.iterdir()}
    return bool(names) and names <= leftovers and (STAGING in names or "phantom.json" in names)


# The dataset every script generates in data/ on first use, and `python -m data.phantom`'s defaults.
DEFAULT = dict(n=600, size=(256, 512), seed=0)


def generate(out_dir, n=DEFAULT["n"], size=DEFAULT["size"], seed=DEFAULT["seed"], workers=None, own_folder=False,
             classes=1, flag="--out"):
    """Write n phantom cases to out_dir/images, out_dir/masks and out_dir/phantom.json, with a progress
    bar on stderr; with `classes` 2, the two sinuses are mask values 1 (image left) and 2 (image
    right), declared in out_dir/classes.json. `flag` names out_dir in errors.

    Everything is rendered into a staging folder first and moved into place with images/ last,
    so a folder with images/ always holds a complete dataset; an interrupted run leaves only
    leftovers that the next run removes.
    """
    out_dir = Path(out_dir)
    if (out_dir / "images").exists():
        raise UserError(f"{flag} {out_dir}: already holds images/; choose an empty folder")
    if own_folder or is_interrupted_phantom(out_dir):   # own_folder: data/, whose code is no leftover
        shutil.rmtree(out_dir / STAGING, ignore_errors=True)
        shutil.rmtree(out_dir / "masks", ignore_errors=True)
        (out_dir / "phantom.json").unlink(missing_ok=True)
        (out_dir / "classes.json").unlink(missing_ok=True)
    staging = out_dir / STAGING
    try:
        (staging / "images").mkdir(parents=True)
        (staging / "masks").mkdir()
    except OSError as err:
        raise UserError(f"{flag} {out_dir}: cannot write there ({err.strerror}); choose a writable folder") from None
    workers = workers or len(os.sched_getaffinity(0))
    sides = classes == 2
    jobs = [(staging, seed, i, tuple(size), sides) for i in range(n)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(_write_case, jobs, chunksize=4), desc="phantom", total=n, dynamic_ncols=True,
                      mininterval=1.0):
            pass
    info = dict(generator="sinus-wkd panoramic phantom", format_version=FORMAT_VERSION, n=n,
                size=list(size), seed=seed, ids=f"{case_id(0)} .. {case_id(n - 1)}",
                case_seed="numpy SeedSequence([seed, index])", sixteen_bit_every=SIXTEEN_BIT_EVERY,
                mask="union of both sinus lobes, 255 = sinus", sinus=SINUS, acquisition=ACQUISITION,
                structures=[f.__name__ for f in ANATOMY])
    if sides:
        info["mask"] = SIDES_MASK
        (staging / "classes.json").write_text(json.dumps(SIDE_CLASSES) + "\n")
    (staging / "phantom.json").write_text(json.dumps(info, indent=1))
    for name in ("phantom.json", "classes.json", "masks", "images"):    # images/ last: it marks completion
        if (staging / name).exists():
            os.replace(staging / name, out_dir / name)
    staging.rmdir()
    return out_dir


# ---------------------------------------------------------------------------------------------
# contact sheet and command line

def draw_grid(path, seed=0, size=GRID_SIZE, rows=4, cols=2):
    """Save a rows x cols sheet of the first cases of the dataset `seed`, mask contour in red."""
    tiles = []
    for i in range(rows * cols):
        image, mask = render_case(case_seed(seed, i), size)
        rgb = np.repeat(image[..., None], 3, axis=2)
        rgb[mask_boundary(mask.astype(bool))] = (255, 60, 40)
        tiles.append(np.pad(rgb, ((3, 3), (3, 3), (0, 0)), constant_values=255))
    sheet = np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], axis=1) for r in range(rows)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, sheet)
    return path


def parse_args(argv=None):
    ap = OneLineParser(prog="python -m data.phantom", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder to create images/, masks/ and phantom.json in")
    ap.add_argument("--n", type=int, default=DEFAULT["n"], help=f"number of cases (default {DEFAULT['n']})")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                    help="image height and width in pixels (default %d %d; %d %d per --grid cell)"
                         % (*DEFAULT["size"], *GRID_SIZE))
    ap.add_argument("--seed", type=int, default=DEFAULT["seed"],
                    help="dataset seed; case i uses SeedSequence([seed, i])")
    ap.add_argument("--classes", type=int, default=1, choices=(1, 2),
                    help="1: the mask is the union of both sinuses (default); 2: left and right sinus as mask "
                         "values 1 and 2, declared in classes.json")
    ap.add_argument("--grid", type=Path, help="instead of a dataset, draw a PNG sheet of the first 8 cases")
    args = ap.parse_args(argv)
    if (args.out is None) == (args.grid is None):
        ap.error("give exactly one of --out DIR and --grid PNG")
    if args.n < 1:
        ap.error(f"argument --n: {args.n} must be at least 1")
    if args.size is None:
        args.size = GRID_SIZE if args.grid is not None else DEFAULT["size"]
    if min(args.size) < 16:
        ap.error(f"argument --size: {args.size[0]} {args.size[1]} must be at least 16 16")
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    if args.grid is not None:
        print(f"wrote {draw_grid(args.grid, args.seed, tuple(args.size))}")
        return
    generate(args.out, args.n, tuple(args.size), args.seed, classes=args.classes)
    print(f"generated {args.n} phantom cases at {args.size[0]}x{args.size[1]} (seed {args.seed}) "
          f"in {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
