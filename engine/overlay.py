"""Contour overlays for visual checks: the image in gray, ground truth green, prediction red."""
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from kernels.boundary_reference import mask_boundary

GREEN, RED, YELLOW = (40, 220, 60), (240, 40, 40), (250, 220, 40)


def save_overlay(path: Path, image: np.ndarray, target: np.ndarray, pred: np.ndarray) -> None:
    rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    gt_edge, pred_edge = mask_boundary(target.astype(bool)), mask_boundary(pred.astype(bool))
    rgb[gt_edge] = GREEN
    rgb[pred_edge] = RED
    rgb[gt_edge & pred_edge] = YELLOW
    iio.imwrite(path, rgb)
