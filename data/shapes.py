"""Soft-shape toolkit of the phantom: signed distances, soft edges, the pixel canvas, smooth fields.

Shapes live in normalised anatomy coordinates (u, v) in [0, 1]^2 -- u left to right, v top to
bottom -- and are rasterised at pixel centres, so one seed gives the same patient at every size.
Distances (edge widths, line thicknesses) are in image heights, the x-axis scaled by ASPECT, so
soft edges are round in the 2:1 picture. Signed distances are positive inside a shape.
"""
import numpy as np
from scipy import ndimage

ASPECT = 2.0           # width / height of a panoramic field; x-distances are measured in heights
LEFT, RIGHT = 0, 1     # patient sides; the right one is drawn mirrored (see Canvas.coords)


# ---------------------------------------------------------------------------------------------
# shape primitives: signed distances in heights, positive inside

def smoothstep(d, width):
    """0 well outside, 1 well inside, a cubic ramp `width` wide centred on the edge d = 0."""
    t = np.clip(0.5 + d / width, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def ridge(d, width):
    """A thin line along d = 0 (a cortical outline), of half-width about `width`."""
    return np.exp(-(d / width) ** 2)


def ellipse(U, V, cu, cv, ru, rv):
    """Approximate signed distance to an axis-aligned ellipse (radii in u and v units)."""
    r = np.sqrt(((U - cu) / ru) ** 2 + ((V - cv) / rv) ** 2)
    return (1.0 - r) * min(ru * ASPECT, rv)


def rounded_box(U, V, cu, cv, hu, hv, radius):
    """Signed distance to a box centred at (cu, cv) with half sizes (hu, hv) and round corners."""
    qx = np.abs(U - cu) * ASPECT - (hu * ASPECT - radius)
    qy = np.abs(V - cv) - (hv - radius)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return radius - outside - np.minimum(np.maximum(qx, qy), 0)


def segment(U, V, p0, p1, w0, w1):
    """Signed distance to a tapered stroke from p0 (half-width w0) to p1 (half-width w1)."""
    ax, ay = p0[0] * ASPECT, p0[1]
    bx, by = p1[0] * ASPECT, p1[1]
    px, py = U * ASPECT - ax, V - ay
    dx, dy = bx - ax, by - ay
    t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return w0 + (w1 - w0) * t - np.hypot(px - t * dx, py - t * dy)


def polyline(U, V, points, width):
    """Signed distance to a stroke of constant half-width along a polyline."""
    return np.max([segment(U, V, a, b, width, width) for a, b in zip(points[:-1], points[1:])], axis=0)


def smooth_max(a, b, k):
    """Maximum of two distances with the joint filleted over a length k (soft union)."""
    return -smooth_min(-a, -b, k)


def bezier(p0, p1, p2, n=12):
    """Points of a quadratic Bezier curve (a smoothly bent bone outline)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t ** 2 * np.array(p2)


def smooth_min(a, b, k):
    """Minimum of two distances with the corner rounded over a length k (soft intersection)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


# ---------------------------------------------------------------------------------------------
# the canvas: anatomy coordinates of every pixel and the attenuation being summed

class Canvas:
    """Pixel grid of one radiograph, with the patient's positioning error already applied.

    `window(u0, u1, v0, v1)` gives the pixel slices covering an anatomy box, so small structures
    (a tooth) cost only their own pixels; `add` accumulates attenuation there.
    """

    def __init__(self, size, tilt_deg, magnification, shift):
        self.H, self.W = size
        yd = (np.arange(self.H, dtype=np.float32) + 0.5) / self.H - 0.5
        xd = ((np.arange(self.W, dtype=np.float32) + 0.5) / self.W - 0.5) * ASPECT
        c, s = np.cos(np.radians(tilt_deg)), np.sin(np.radians(tilt_deg))
        self.rot, self.mag, self.shift = np.array([[c, -s], [s, c]]), magnification, np.asarray(shift)
        X, Y = np.meshgrid(xd, yd)
        # detector -> anatomy: undo magnification and rotation about the image centre
        xa = (c * X + s * Y) / magnification + shift[0]
        ya = (-s * X + c * Y) / magnification + shift[1]
        self.U = (xa / ASPECT + 0.5).astype(np.float32)
        self.V = (ya + 0.5).astype(np.float32)
        self.att = np.zeros(size, np.float32)
        self.mask = np.zeros(size, np.uint8)   # 0 background, 1 + side inside each sinus lobe

    def window(self, u0, u1, v0, v1):
        corners = np.array([[(u - 0.5) * ASPECT - self.shift[0], v - 0.5 - self.shift[1]]
                            for u in (u0, u1) for v in (v0, v1)])
        det = corners @ self.rot.T * self.mag            # anatomy -> detector
        cols = (det[:, 0] / ASPECT + 0.5) * self.W
        rows = (det[:, 1] + 0.5) * self.H
        r0, r1 = max(int(rows.min()) - 2, 0), min(int(np.ceil(rows.max())) + 2, self.H)
        c0, c1 = max(int(cols.min()) - 2, 0), min(int(np.ceil(cols.max())) + 2, self.W)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def coords(self, win, side=LEFT):
        """(U, V) in the window; the right side is mirrored so both sides share one drawing."""
        U, V = self.U[win], self.V[win]
        return (U if side == LEFT else 1.0 - U), V

    def side_window(self, side, u0, u1, v0, v1):
        return self.window(u0, u1, v0, v1) if side == LEFT else self.window(1 - u1, 1 - u0, v0, v1)

    def add(self, win, layer):
        self.att[win] += layer


def smooth_field(rng, shape, sigma):
    """A zero-mean unit-std random field on a fixed coarse grid (resolution independent)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / f.std()


def sample(field, U, V):
    """Bilinear lookup of a coarse field at anatomy coordinates."""
    gh, gw = field.shape
    return ndimage.map_coordinates(field, [V * (gh - 1), U * (gw - 1)], order=1, mode="nearest")
