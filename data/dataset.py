"""The dataset-folder contract (SPEC section 1): finding, checking and loading cases; the split
is drawn in split.py.

    DIR/images/<id>.png|jpg|jpeg|tif|tiff   gray or RGB(A), 8 or 16 bit, any size
    DIR/masks/<id>.png                      same size as its image; 0 background, k > 0 sinus
    DIR/splits.json                         optional fixed split

Every problem a user can fix is a UserError naming the file or flag. Images are preprocessed
once, here: luminance, clip to the 1st/99th percentile, scale to [0, 1]. Resizing to the
training size uses bilinear interpolation with antialiasing (area-weighted when shrinking, so
a 2900-pixel radiograph does not alias on its way to 512) and the mask nearest-exact, which
samples at the same pixel centres as the bilinear image.
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_PHANTOM = dict(n=600, size=(256, 512), seed=0)


# ---------------------------------------------------------------------------------------------
# the folder

def prepare_dataset(path) -> Path:
    """Return the dataset root `path`, generating the default phantom there when asked to.

    The phantom is generated when `path` has no images/ and is this package's own folder, an
    existing empty folder, or the leftovers of an interrupted generation. A path that does not
    exist is an error rather than a place to generate into, so a mistyped --data is caught.
    """
    from . import phantom  # here, not at the top: `python -m data.phantom` must not pre-import itself
    root = Path(path)
    if not root.exists():
        raise UserError(f"--data {root}: no such folder; give a dataset folder with images/ "
                        f"(or an empty folder to generate the phantom in)")
    if not root.is_dir():
        raise UserError(f"--data {root}: is a file, not a dataset folder with images/")
    if not (root / "images").exists():
        own = root.resolve() == PACKAGE_DIR
        if not (own or not any(root.iterdir()) or phantom.is_interrupted_phantom(root)):
            raise UserError(f"--data {root}: has no images/ folder; expected {root}/images/<id>.png "
                            f"(and masks/<id>.png), or an empty folder to generate the phantom in")
        start = time.perf_counter()
        phantom.generate(root, **DEFAULT_PHANTOM, own_folder=own)
        h, w = DEFAULT_PHANTOM["size"]
        print(f"generated the default phantom dataset ({DEFAULT_PHANTOM['n']} cases, {h}x{w}, "
              f"seed {DEFAULT_PHANTOM['seed']}) in {root} in {time.perf_counter() - start:.1f} s")
    image_files(root)   # validates the listing: non-empty, known suffixes, no duplicate ids
    mask_files(root)
    return root


def _listing(folder):
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def image_files(root) -> dict:
    """{id: image path} of every image in root/images; raises UserError on a bad listing."""
    folder = Path(root) / "images"
    if not folder.is_dir():
        raise UserError(f"--data {root}: has no images/ folder")
    files = {}
    for path in _listing(folder):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{path}: not a supported image type; use one of "
                            f"{', '.join(IMAGE_SUFFIXES)} (or move the file out of images/)")
        if path.stem in files:
            raise UserError(f"{path} and {files[path.stem]}: two images with the id {path.stem!r}; "
                            f"keep one")
        files[path.stem] = path
    if not files:
        raise UserError(f"--data {root}: images/ is empty; add radiographs as images/<id>.png")
    return files


def mask_files(root) -> dict:
    """{id: mask path} of every mask in root/masks (empty if there is no masks/ folder)."""
    folder = Path(root) / "masks"
    if not folder.is_dir():
        return {}
    images = image_files(root)
    files = {}
    for path in _listing(folder):
        if path.suffix.lower() != ".png":
            raise UserError(f"{path}: masks must be PNG (lossless), named masks/<id>.png")
        if path.stem not in images:
            raise UserError(f"{path}: no image with the id {path.stem!r} in images/; remove the mask "
                            f"or add the image")
        files[path.stem] = path
    return files


def few(ids, k=5):
    """A short listing of ids for an error message."""
    ids = sorted(ids)
    return ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


# ---------------------------------------------------------------------------------------------
# one case

def _read(path, what):
    try:
        return np.asarray(iio.imread(path))
    except Exception as err:   # imageio raises many types for a bad file; all mean the same here
        # a decoder's own words help when short ("Truncated File Read"); long ones are internals
        words = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f" ({words})" if 0 < len(words) <= 60 and "/" not in words else ""
        raise UserError(f"{path}: cannot decode this {what}{reason}; it is corrupt or not a "
                        f"{path.suffix.lstrip('.').upper()} file, replace or remove it")


def _to_gray(array, path):
    if array.ndim == 3 and array.shape[-1] in (3, 4):    # RGB(A): luminance, alpha ignored
        array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif array.ndim == 3 and array.shape[-1] in (1, 2):  # gray (+ alpha)
        array = array[..., 0]
    if array.ndim != 2:
        raise UserError(f"{path}: expected one 2-D gray or RGB image, got an array of shape {array.shape}")
    return array


def preprocess(image):
    """Clip to the 1st/99th percentile and scale to [0, 1] (float32)."""
    image = image.astype(np.float64)
    lo, hi = np.percentile(image, [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)


def _read_mask(path, shape, image_path):
    mask = _read(path, "mask")
    if mask.ndim == 3:
        mask = mask[..., :3].max(-1) if mask.shape[-1] >= 3 else mask[..., 0]
    if mask.shape != shape:
        raise UserError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image {image_path.name} "
                        f"is {shape[0]}x{shape[1]}; masks must match their image's size")
    values = np.unique(mask)
    if len(values[values != 0]) > 1:
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise UserError(f"{path}: mask values {shown} are not {{0, k}}; save a binary mask "
                        f"(0 background, one value for sinus)")
    return mask != 0


def _load(image_path, mask_path):
    image = _to_gray(_read(image_path, "image"), image_path)
    mask = None if mask_path is None else _read_mask(mask_path, image.shape, image_path)
    return preprocess(image), mask


def load_case(root, case_id):
    """(image float32 (H0, W0) in [0, 1], mask bool (H0, W0) or None) at the original size."""
    images = image_files(root)
    if case_id not in images:
        raise UserError(f"--data {root}: no image for id {case_id!r} in images/")
    return _load(images[case_id], mask_files(root).get(case_id))


# ---------------------------------------------------------------------------------------------
# many cases at training size

def _resize(image, mask, size):
    x = torch.from_numpy(image)[None, None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0]
    if mask is None:
        return x, None
    m = torch.from_numpy(mask.astype(np.uint8))[None, None]
    return x, F.interpolate(m, size=size, mode="nearest-exact")[0, 0].long()


def load_tensors(root, ids, size, with_masks=True):
    """images float32 (N, 1, H, W) and masks int64 {0, 1} (N, H, W) (or None), resized to `size`.

    Decoding is the whole cost, so cases are read on a thread pool over all cores: PNG/JPEG
    decoding, the percentile and the resize release the GIL, and threads avoid copying every
    decoded image between processes.
    """
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"--size {' '.join(map(str, size))}: give two positive integers H W")
    images, masks = image_files(root), mask_files(root) if with_masks else {}
    missing = [i for i in ids if i not in images] + [i for i in ids if with_masks and i not in masks]
    if missing:
        what = "an image or mask" if with_masks else "an image"
        raise UserError(f"--data {root}: ids without {what}: {few(missing)}")

    def job(case_id):
        image, mask = _load(images[case_id], masks.get(case_id))
        return _resize(image, mask, size)

    workers = min(len(os.sched_getaffinity(0)), max(len(ids), 1))
    with ThreadPoolExecutor(workers) as pool:
        cases = list(pool.map(job, ids))
    h, w = size
    x = torch.stack([c[0] for c in cases])[:, None] if cases else torch.zeros(0, 1, h, w)
    if not with_masks:
        return x, None
    y = torch.stack([c[1] for c in cases]) if cases else torch.zeros(0, h, w, dtype=torch.long)
    return x, y
