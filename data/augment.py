"""Deterministic batches and augmentation: every random draw is a pure function of the step.

A resumed run replays the same batches and the same augmentations as an uninterrupted one,
because nothing here carries state from step to step: batch k of a run with seed s is always
the same indices, and its augmentation generator is seeded from (s, k, stream).
"""
import dataclasses
import hashlib
import math

import torch
import torch.nn.functional as F

from errors import UserError


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Strengths of the random geometric augmentation; its values are the stages' settings."""
    rotate: float           # maximum rotation, degrees
    scale: tuple            # zoom range (low, high)
    shift: float            # maximum translation, fraction of the image size
    flip: float             # probability of a horizontal flip


@dataclasses.dataclass(frozen=True)
class Photometric:
    """Strengths of the random intensity augmentation."""
    gamma: float            # log-gamma drawn from [-gamma, gamma]
    contrast: tuple         # contrast factor range (low, high)
    brightness: float       # brightness offset drawn from [-brightness, brightness]
    noise: float            # Gaussian noise sigma drawn from [0, noise]


@dataclasses.dataclass(frozen=True)
class Corruption:
    """Strengths of what the noised student's view of an unlabelled image adds on top of the
    photometric changes: blur and cutout. The teacher never sees them."""
    blur: float             # Gaussian blur sigma drawn from [0, blur * image height]
    cutout: float           # side of one hole per image, as a fraction of each image side (0: none)


def strengths(cls, settings, prefix: str):
    """A Geometry or Photometric from the settings fields named `prefix + field`."""
    return cls(**{f.name: getattr(settings, prefix + f.name) for f in dataclasses.fields(cls)})


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across runs, unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """CPU generator for the draws of one step of one stream (e.g. "labeled", "unlabeled")."""
    return torch.Generator().manual_seed(derive_seed(seed, step, stream))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices into range(n) of batch `step`: epochs of fresh permutations, walked in order.

    Position p of the endless stream is element p % n of epoch p // n's permutation, so a batch
    may straddle two epochs and every index appears once per epoch.
    """
    if n < 1:
        raise ValueError(f"batch_indices: n={n} must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))
        here = epochs == epoch
        out[here] = perm[positions[here] % n]
    return out


def augment_geometry(images, masks, g, geometry: Geometry):
    """Random rotation, scale, translation and horizontal flip of a batch, one draw per image.

    images (N, 1, H, W) are resampled bilinearly (border values extend outwards), masks
    (N, H, W) or None by nearest neighbour with the same grid, so both stay aligned. The flip
    is valid because the target is the union of both sinuses and a panoramic view is roughly
    left-right symmetric. Runs on the device the images live on.
    """
    n, _, h, w = images.shape
    scale = geometry.scale
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(geometry.rotate)
    zoom = scale[0] + torch.rand(n, generator=g) * (scale[1] - scale[0])
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * geometry.shift * 2     # normalised coords span 2
    flip = torch.where(torch.rand(n, generator=g) < geometry.flip, -1.0, 1.0)
    # affine_grid maps output to input in [-1, 1] coordinates; rotate in pixel units (aspect a)
    # so that a rotation stays a rotation on a non-square image
    a = w / h
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([flip * cos, -flip * sin / a, shift[:, 0]], 1),
                         torch.stack([sin * a, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks[:, None].to(images.dtype), grid, mode="nearest",
                              padding_mode="zeros", align_corners=False)[:, 0].round().long()
    return images, masks


def augment_photometric(images, g, photometric: Photometric):
    """Random gamma, contrast, brightness and Gaussian noise per image; output clamped to [0, 1]."""
    gamma, contrast, brightness, noise = dataclasses.astuple(photometric)
    n = images.shape[0]
    per_image = (n,) + (1,) * (images.dim() - 1)

    def draw(lo, hi):
        return (lo + torch.rand(per_image, generator=g) * (hi - lo)).to(images.device, images.dtype)

    x = images.clamp(0, 1) ** torch.exp(draw(-gamma, gamma))
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    x = (x - mean) * draw(*contrast) + mean + draw(-brightness, brightness)
    # noise is drawn on the images' device from a generator seeded by g, so it is as
    # deterministic as the rest without a host-to-device copy of a full noise tensor
    device_seed = int(torch.randint(2 ** 62, (1,), generator=g))
    device_g = torch.Generator(device=images.device).manual_seed(device_seed)
    x = x + draw(0, noise) * torch.randn(x.shape, generator=device_g, device=x.device, dtype=x.dtype)
    return x.clamp(0, 1)


def blur(images, sigma: torch.Tensor):
    """Separable Gaussian blur with one sigma (pixels) per image; sigma 0 leaves an image as it is."""
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)                       # (N, 2r + 1)
    n, c, h, w = images.shape
    x = F.pad(images.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    rows = kernels.repeat_interleave(c, 0)[:, None, :, None]
    x = F.conv2d(x, rows, groups=n * c)
    x = F.conv2d(x, rows.transpose(2, 3), groups=n * c)
    return x.reshape(n, c, h, w)


def corrupt(images, g, corruption: Corruption):
    """Random blur and one cutout hole (filled with the image's mean) per image."""
    n, _, h, w = images.shape
    sigma = torch.rand(n, generator=g) * corruption.blur * h
    x = blur(images, sigma.to(images.device, images.dtype)) if corruption.blur > 0 else images
    if corruption.cutout > 0:
        hh, ww = max(1, round(corruption.cutout * h)), max(1, round(corruption.cutout * w))
        top = (torch.rand(n, generator=g) * (h - hh + 1)).long()
        left = (torch.rand(n, generator=g) * (w - ww + 1)).long()
        rows = torch.arange(h)[None, :, None]
        cols = torch.arange(w)[None, None, :]
        hole = ((rows >= top[:, None, None]) & (rows < (top + hh)[:, None, None])
                & (cols >= left[:, None, None]) & (cols < (left + ww)[:, None, None]))[:, None].to(x.device)
        x = torch.where(hole, x.mean(dim=(1, 2, 3), keepdim=True), x)
    return x


def labeled_batch(images, masks, batch_size: int, seed: int, step: int, device, geometry: Geometry,
                  photometric: Photometric):
    """Batch `step` of the labelled stream, geometrically and photometrically augmented."""
    idx = batch_indices(len(images), batch_size, seed, step)
    g = step_generator(seed, step, "labeled")
    x, y = augment_geometry(images[idx].to(device), masks[idx].to(device), g, geometry)
    return augment_photometric(x, g, photometric), y


def unlabeled_views(images, batch_size: int, seed: int, step: int, device, geometry: Geometry,
                    strong: Photometric, corruption: Corruption, masks=None):
    """Batch `step` of the unlabelled stream as (clean view, noised view, masks or None): one geometry
    for all, so targets computed on the clean view line up with the student's predictions on the
    noised one (and with the true masks, which only the oracle upper bounds are given)."""
    idx = batch_indices(len(images), batch_size, derive_seed(seed, "unlabeled"), step)
    g = step_generator(seed, step, "unlabeled")
    clean, truth = augment_geometry(images[idx].to(device), None if masks is None else masks[idx].to(device), g,
                                    geometry)
    return clean, corrupt(augment_photometric(clean, g, strong), g, corruption), truth
