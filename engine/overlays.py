"""Contour overlays that a reader sees at full size: the radiograph in gray with each mask's contour,
its lines as wide as the image needs to stay visible when it is fit to a screen, every sizeable
predicted region labelled with its class, the side of the image it lies on and its area, and a
header with the case id, a legend and (evaluation) the case's scores.

The colours are the Okabe-Ito palette, which readers with any common colour-vision deficiency can
tell apart: ground truth sky blue and prediction orange for one class (yellow where they
coincide); with several classes each predicted class in its own colour over the ground truth in
white.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from kernels.boundary import mask_boundary

ORANGE, SKY_BLUE, GREEN, YELLOW = (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66)
BLUE, VERMILLION, PURPLE, WHITE = (0, 114, 178), (213, 94, 0), (204, 121, 167), (255, 255, 255)
TRUTH, PREDICTION, BOTH = SKY_BLUE, ORANGE, YELLOW
CLASS_COLOURS = (ORANGE, SKY_BLUE, GREEN, YELLOW, VERMILLION, PURPLE, BLUE)
PIXELS_PER_LINE = 700      # a contour one pixel wide per this many pixels of the image's longer side
LABELLED_SHARE = 0.05      # regions of at least this share of their class's largest region are labelled


def line_width(shape) -> int:
    """Contour width in pixels: 1 on a 512-pixel phantom, 4 on a 2900-pixel panorama, which a screen
    shows at half size or less."""
    return max(1, round(max(shape) / PIXELS_PER_LINE))


def contour(mask: np.ndarray, width: int) -> np.ndarray:
    """The boundary of a boolean mask, widened to about `width` pixels."""
    edge = mask_boundary(mask)
    radius = (width - 1) // 2
    return ndimage.binary_dilation(edge, iterations=radius) if radius else edge


def font_for(shape):
    return ImageFont.load_default(size=max(10, round(max(shape) / 60)))


def area_text(pixels: int, spacing) -> str:
    return f"{pixels} px" if spacing is None else f"{pixels * spacing[0] * spacing[1]:.1f} mm2"


def region_labels(pred: np.ndarray, names) -> list:
    """[(class index, rows, centre column, pixels)] of each labelled region, `rows` its top and bottom:
    per class, the connected regions of at least LABELLED_SHARE of its largest."""
    out = []
    for c in range(1, len(names) + 1):
        regions, count = ndimage.label(pred == c)
        if not count:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        out += [(c, (box[0].start, box[0].stop), (box[1].start + box[1].stop) / 2, int(size))
                for size, box in zip(sizes, ndimage.find_objects(regions)) if size >= LABELLED_SHARE * sizes.max()]
    return out


def draw_text(draw: ImageDraw.ImageDraw, xy, parts, font, centred: bool = False) -> None:
    """Coloured `parts` [(text, colour)] in one line from `xy` (or centred on it), on a dark box so that
    they read on any image, moved inside the image where they would leave it."""
    length = sum(draw.textlength(text, font=font) for text, _ in parts)
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
    pad = max(2, (bottom - top) // 4)
    (columns, rows), (x, y) = draw.im.size, xy
    x = min(max(x - length / 2 if centred else x, pad), max(columns - length - pad, pad))
    y = min(max(y - (bottom + top) / 2 if centred else y, pad - top), max(rows - bottom - pad, pad - top))
    draw.rectangle((x - pad, y + top - pad, x + length + pad, y + bottom + pad), fill=(0, 0, 0))
    for text, colour in parts:
        draw.text((x, y), text, fill=colour, font=font)
        x += draw.textlength(text, font=font)


def save_overlay(path: Path, image: np.ndarray, pred: np.ndarray, names, target: np.ndarray | None = None,
                 header: str = "", spacing=None) -> None:
    """Write the overlay of the class indices `pred` (and the ground truth `target`) on `image` (2-D, in
    [0, 1]) to `path`; `names` are the classes, `header` what follows the case id's place at the
    top (the id, and an evaluation's scores), `spacing` (row mm, column mm) or None gives the areas'
    unit."""
    rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    width = line_width(image.shape)
    if target is not None and len(names) == 1:
        truth, predicted = contour(target == 1, width), contour(pred == 1, width)
        rgb[truth] = TRUTH
        rgb[predicted] = PREDICTION
        rgb[truth & predicted] = BOTH
        legend = [("  ground truth", TRUTH), ("  prediction", PREDICTION)]
    else:
        for c in range(1, len(names) + 1):
            if target is not None:
                rgb[contour(target == c, width)] = WHITE
        for c in range(1, len(names) + 1):
            rgb[contour(pred == c, width)] = CLASS_COLOURS[c - 1]
        legend = ([("  ground truth", WHITE)] if target is not None else []) + \
            [(f"  {name}", CLASS_COLOURS[c]) for c, name in enumerate(names)]
    picture = Image.fromarray(rgb)
    draw, font = ImageDraw.Draw(picture), font_for(image.shape)
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
    line = bottom - top + 2 * width
    for c, (first, last), col, pixels in region_labels(pred, names):
        side = "image left" if col < image.shape[1] / 2 else "image right"
        colour = PREDICTION if target is not None and len(names) == 1 else CLASS_COLOURS[c - 1]
        row = first - line if first >= 2.5 * line else last + line      # above the region, below the header
        draw_text(draw, (col, row), [(f"{names[c - 1]}, {side}: {area_text(pixels, spacing)}", colour)], font,
                  centred=True)
    draw_text(draw, (0, 0), [(header, WHITE), *legend], font)
    picture.save(path, format="PNG", compress_level=1)     # the default level takes seconds on a panorama
