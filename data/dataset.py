"""The dataset-folder contract (SPEC section 1): finding, checking and loading cases; the split
is drawn in split.py.

    DIR/images/<id>.png|jpg|jpeg|tif|tiff   gray or RGB(A), 8 or 16 bit, any size
    DIR/images/<id>.dcm|dicom or <id>       a DICOM radiograph (an extension-less file by its preamble)
    DIR/masks/<id>.png                      same size as its image; 0 background, k > 0 sinus
    DIR/splits.json                         optional fixed split
    DIR/classes.json                        optional classes, {"1": "left sinus", ...} (classes.py)

Every problem a user can fix is a UserError naming the file or flag; pixels that are not finite
numbers are one, a constant image (a blank exposure) a warning. Images are preprocessed once,
here: luminance (DICOM: the displayed values, see dicom.py), clip to the 1st/99th percentile,
scale to [0, 1]. Resizing to the training size uses bilinear interpolation with antialiasing
(area-weighted when shrinking, so a 2900-pixel radiograph does not alias on its way to 512) and
the mask nearest-exact, which samples at the same pixel centres as the bilinear image.
"""
import errno
import os
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from errors import UserError, problems_error

from .classes import Classes, binary
from .dicom import DICOM_SUFFIXES, has_preamble, header_spacing, read_dicom

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES
PACKAGE_DIR = Path(__file__).resolve().parent


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
        phantom.generate(root, **phantom.DEFAULT, own_folder=own, flag="--data")
        h, w = phantom.DEFAULT["size"]
        print(f"generated the default phantom dataset ({phantom.DEFAULT['n']} cases, {h}x{w}, "
              f"seed {phantom.DEFAULT['seed']}) in {root} in {time.perf_counter() - start:.1f} s")
    return root


def _listing(folder):
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def is_raster(path: Path) -> bool:
    """An image file imageio decodes; every other file list_images lets through is DICOM."""
    return path.suffix.lower() in RASTER_SUFFIXES


def image_id(path: Path):
    """The case id of an image file (its name without the image suffix), or None if it is not one. DICOM
    files from a PACS often have no suffix, or a UID as their name: those are known by their preamble
    and keep their whole name."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return path.stem
    return path.name if has_preamble(path) else None


def unreadable_entry(path: Path):
    """Why an entry of images/ or masks/ cannot be a case's file (a folder, or a link that loops or
    points to nothing), or None."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if path.is_symlink():
            what = "loops" if err.errno == errno.ELOOP else f"points to nothing ({os.readlink(path)})"
            return f"{path}: a link that {what}; replace it with the file it should point to, or remove it"
        return f"{path}: cannot be read ({err.strerror})"
    if stat.S_ISDIR(mode):
        return f"{path}: is a folder, not a file; move it out of {path.parent.name}/"
    return None


def list_images(folder, problems: list) -> dict:
    """{id: image path} of the images in `folder`; a file that is not one is added to `problems`."""
    files = {}
    for path in _listing(folder):
        if (problem := unreadable_entry(path)) is not None:
            problems.append(problem)
            continue
        case_id = image_id(path)
        if case_id is None:
            problems.append(f"{path}: not a supported image type; use one of {', '.join(IMAGE_SUFFIXES)} "
                            f"or a DICOM file (or move the file out of {folder.name}/)")
        elif case_id in files:
            problems.append(f"{path} and {files[case_id]}: two images with the id {case_id!r}; keep one")
        else:
            files[case_id] = path
    return files


def scan(root) -> tuple[dict, dict, list]:
    """The images and masks of a dataset folder by id, listed once, and the problems of the listing."""
    root, problems = Path(root), []
    if not (root / "images").is_dir():
        raise UserError(f"--data {root}: has no images/ folder")
    images = list_images(root / "images", problems)
    if not images and not problems:
        raise UserError(f"--data {root}: images/ is empty; add radiographs as images/<id>.png")
    masks = {}
    for path in _listing(root / "masks") if (root / "masks").is_dir() else []:
        if (problem := unreadable_entry(path)) is not None:
            problems.append(problem)
        elif path.suffix.lower() != ".png":
            problems.append(f"{path}: masks must be PNG (lossless), named masks/<id>.png")
        elif path.stem not in images:
            problems.append(f"{path}: no image with the id {path.stem!r} in images/; remove the mask or add the image")
        else:
            masks[path.stem] = path
    return images, masks, problems


def few(ids, k=5):
    """A short listing of ids for an error message."""
    ids = sorted(ids)
    return ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


# ---------------------------------------------------------------------------------------------
# one case

# Why a file is decoded: for its pixels (an image, or a mask training or scoring reads), or only to
# check its format (a mask's size and values, as the data check does for every mask; the pixels
# are dropped there, so the masks of unlabelled and test cases can be checked without being used).
# decode() takes the purpose so that the leakage tests can record it (the `opened` fixture of tests/conftest.py).
PIXELS, FORMAT_CHECK = "pixels", "format check"


def decode(path, what, purpose=PIXELS):
    try:
        return np.asarray(iio.imread(path))
    except Exception as err:   # imageio raises many types for a bad file; all mean the same here
        # a decoder's own words help when short ("Truncated File Read"); long ones are internals
        words = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f" ({words})" if 0 < len(words) <= 60 and "/" not in words else ""
        raise UserError(f"{path}: cannot decode this {what}{reason}; it is corrupt or not a "
                        f"{path.suffix.lstrip('.').upper()} file, replace or remove it")


def to_gray(array, path):
    if array.ndim == 3 and array.shape[-1] in (3, 4):    # RGB(A): luminance, alpha ignored
        array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif array.ndim == 3 and array.shape[-1] in (1, 2):  # gray (+ alpha)
        array = array[..., 0]
    if array.ndim != 2:
        raise UserError(f"{path}: expected one 2-D gray or RGB image, got an array of shape {array.shape}")
    return array


def read_image(path):
    """(2-D gray image, bits per stored sample) of the radiograph at `path`, any supported type; pixels
    that are not finite numbers (a float TIFF's NaN holes) are an error naming the file, since every
    later step (percentiles, losses, the prediction) would silently turn them into garbage."""
    if is_raster(path):
        raw = decode(path, "image")
        image = to_gray(raw, path)
        bits = 1 if raw.dtype == bool else raw.dtype.itemsize * 8 if raw.dtype.kind in "ui" else str(raw.dtype)
    else:
        image, bits = read_dicom(path)
    if image.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            raise UserError(f"{path}: {bad} of its {image.size} pixels are NaN or infinite; a radiograph holds "
                            f"finite intensities, so fix the file or remove it")
    return image, bits


def constant_warning(image, path):
    """A warning naming the image if all its pixels are equal (a blank exposure), else None."""
    lo = image.min()
    return f"{path}: every pixel is {lo:g}, a blank image; it teaches and shows nothing" if lo == image.max() else None


def warn(message) -> None:
    """A one-line warning on stderr (beside any progress bar, which keeps stdout for results)."""
    print(f"warning: {message}", file=sys.stderr)


def preprocess(image):
    """Clip to the 1st/99th percentile and scale to [0, 1] (float32)."""
    image = image.astype(np.float64)
    lo, hi = np.percentile(image, [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)


def read_mask(path, shape, image_path, purpose=PIXELS):
    """The 2-D mask at `path`, checked to be `shape` (its image's size) unless that is None; `purpose`
    says why it is decoded (PIXELS or FORMAT_CHECK)."""
    mask = decode(path, "mask", purpose)
    if mask.ndim == 3:
        mask = mask[..., :3].max(-1) if mask.shape[-1] >= 3 else mask[..., 0]
    if shape is not None and mask.shape != shape:
        raise UserError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image {image_path.name} "
                        f"is {shape[0]}x{shape[1]}; masks must match their image's size")
    return mask


def _resize(image, labels, size):
    x = torch.from_numpy(image)[None, None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0]
    if labels is None:
        return x, None
    m = torch.from_numpy(labels)[None, None]
    return x, F.interpolate(m, size=size, mode="nearest-exact")[0, 0].long()


def in_parallel(job, items) -> list:
    """job(item) for every item on a thread pool over all cores: PNG/JPEG decoding, the percentile and
    the resize release the GIL, and threads avoid copying decoded images between processes."""
    workers = min(len(os.sched_getaffinity(0)), max(len(items), 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(job, items))


# ---------------------------------------------------------------------------------------------
# the dataset

class Dataset:
    """The images and masks of a dataset by id, listed once, and the classes its masks hold."""

    def __init__(self, images: dict, masks: dict, classes: Classes | None = None, root=None):
        self.images, self.masks, self.classes, self.root = images, masks, classes or binary(), root

    @classmethod
    def open(cls, root, classes: Classes | None = None) -> "Dataset":
        images, masks, problems = scan(root)
        if problems:
            raise problems_error(problems, f"--data {root}")
        return cls(images, masks, classes, Path(root))

    def read(self, case_id, with_mask: bool = True):
        """(image float32 (H0, W0) in [0, 1], class indices uint8 (H0, W0) or None) at the original size;
        without `with_mask` the mask file is not opened at all (unlabelled cases, whatever is on disk)."""
        path = self.images[case_id]
        image, _ = read_image(path)
        if (warning := constant_warning(image, path)) is not None:
            warn(warning)
        mask = self.masks.get(case_id) if with_mask else None
        labels = None if mask is None else self.classes.labels(read_mask(mask, image.shape, path), mask)
        return preprocess(image), labels

    def spacing(self, case_id):
        """(row mm, column mm, source) its header states for a DICOM case; None for any other."""
        path = self.images[case_id]
        return None if is_raster(path) else header_spacing(path)

    def tensors(self, ids, size, with_masks=True):
        """images float32 (N, 1, H, W) and class indices int64 (N, H, W) (or None), resized to `size`."""
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise UserError(f"--size {' '.join(map(str, size))}: give two positive integers H W")
        missing = [i for i in ids if i not in self.images or (with_masks and i not in self.masks)]
        if missing:
            what = "an image or mask" if with_masks else "an image"
            raise UserError(f"--data {self.root}: ids without {what}: {few(missing)}")

        def job(case_id):
            image, labels = self.read(case_id, with_masks)
            return _resize(image, labels, size)

        cases = in_parallel(job, ids)
        h, w = size
        x = torch.stack([c[0] for c in cases])[:, None] if cases else torch.zeros(0, 1, h, w)
        if not with_masks:
            return x, None
        y = torch.stack([c[1] for c in cases]) if cases else torch.zeros(0, h, w, dtype=torch.long)
        return x, y

    def batches(self, ids, size, batch_size: int):
        """(ids, [(image, labels or None)] at the original size, images (n, 1, H, W) at `size`) of
        consecutive batches: every case is decoded once, and only one batch is held at a time."""
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            cases = in_parallel(self.read, chunk)
            yield chunk, cases, torch.stack([_resize(image, None, size)[0] for image, _ in cases])[:, None]


def load_tensors(root, ids, size, with_masks=True, classes: Classes | None = None):
    """Dataset.tensors of the dataset folder `root`."""
    return Dataset.open(root, classes).tensors(ids, size, with_masks)
