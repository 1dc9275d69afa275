"""Synthetic full-size panoramas for the cost measurements and the full-size test: smooth gray
radiographs with detector-like noise and two dark elliptic sinuses, at any size, fast to draw."""
import numpy as np


def panorama(rng: np.random.Generator, size=(1435, 2943)):
    """(image float in [0, 1], mask bool) of one synthetic radiograph of `size` (H, W)."""
    h, w = size
    y, x = np.ogrid[0:h, 0:w]
    mask = np.zeros(size, bool)
    for cx in (0.3, 0.7):
        cx, cy = (cx + rng.uniform(-0.03, 0.03)) * w, rng.uniform(0.22, 0.3) * h
        mask |= ((x - cx) / (0.09 * w)) ** 2 + ((y - cy) / (0.12 * h)) ** 2 < 1
    image = 0.5 + 0.2 * np.sin(x / w * 6 + rng.uniform(0, 6)) * np.cos(y / h * 4) - 0.2 * mask
    return np.clip(image + rng.normal(0, 0.03, size), 0, 1), mask


def write_case(root, case_id: str, image, mask=None, sixteen_bit=False):
    """images/<id>.png (8-bit) or images/<id>.tif (16-bit), and masks/<id>.png (255 = sinus) if given."""
    import imageio.v3 as iio
    if sixteen_bit:
        iio.imwrite(root / "images" / f"{case_id}.tif", np.round(image * 65535).astype(np.uint16))
    else:
        iio.imwrite(root / "images" / f"{case_id}.png", np.round(image * 255).astype(np.uint8))
    if mask is not None:
        iio.imwrite(root / "masks" / f"{case_id}.png", mask.astype(np.uint8) * np.uint8(255))
