"""Procedural panoramic radiograph phantom with exact maxillary-sinus masks (SPEC section 1.1).

The picture is built like an X-ray: every anatomical structure adds a smooth attenuation layer
(bone and teeth add brightness, air subtracts it), each with soft edges and per-patient random
size, asymmetry, position and contrast. The acquisition (blur, quantum noise, gamma, contrast,
vignetting) is applied to the sum. Shapes live in normalised anatomy coordinates (u, v) in
[0, 1]^2 -- u left to right, v top to bottom -- and are rasterised at pixel centres, so one
seed gives the same patient at every size. Distances (edge widths, line thicknesses) are in
image heights, the x-axis scaled by ASPECT, so soft edges are round in the 2:1 picture.

The mask is the union of the two sinus lobes, evaluated exactly (no antialiasing) from the same
implicit shape that darkens the image. The sinuses are deliberately hard to see and vary a lot
from patient to patient, so that learning their outline takes many examples: low air contrast,
faint roofs, frequent mucosal thickening, cysts, fluid levels or full opacification, lobulated
outlines with recesses and septa, hypoplastic lobes, a palate band across the floor, zygomatic
bone, airway and nasal air overlapping the walls, frequent positioning errors and a share of
poorly exposed (flat, noisy, blurred) images.

    python -m data.phantom --out DIR --n N --size H W --seed S
    python -m data.phantom --grid docs/phantom_grid.png
"""
import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from scipy import ndimage

from engine.errors import UserError, exit_on_user_error
from kernels.boundary_reference import mask_boundary

ASPECT = 2.0           # width / height of a panoramic field; x-distances are measured in heights
FORMAT_VERSION = 2     # bump when the generator changes what a seed draws
SIXTEEN_BIT_EVERY = 10  # every 10th case is written as a 16-bit PNG to exercise that decode path
LEFT, RIGHT = 0, 1
GRID_SIZE = (160, 320)  # cells of the contact sheet: small enough to keep docs/ light
STAGING = ".phantom-partial"  # generate() renders here, then moves the finished dataset into place

# Per-patient ranges of the target structure (also recorded in phantom.json).
SINUS = dict(
    lateral_wall_u=(0.185, 0.25), medial_wall_u=(0.37, 0.43), roof_v=(0.10, 0.155),
    floor_v=(0.35, 0.46), air=(0.06, 0.16), roof_edge=(0.015, 0.04), floor_edge=(0.008, 0.02),
    lobulation=(0.0, 0.025), p_recess=0.6, p_hypoplasia=0.15, p_septum=0.45,
    opacification=dict(none=0.25, mucosal=0.35, cyst=0.12, fluid=0.13, full=0.15),
)
ACQUISITION = dict(blur_heights=(0.0015, 0.004), noise=(0.025, 0.06), gamma=(0.7, 1.45),
                   contrast=(0.8, 1.2), vignetting=(0.1, 0.4), p_positioning_error=0.4,
                   p_poor_exposure=0.3, poor_blur_heights=(0.003, 0.007), poor_noise=(0.05, 0.09),
                   poor_contrast=(0.55, 0.8))


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
        self.mask = np.zeros(size, bool)

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


# ---------------------------------------------------------------------------------------------
# the patient: global layout shared by several structures

class Patient:
    """Random layout of one patient: bite line, palate level, tooth positions, sinus shapes."""

    def __init__(self, rng):
        self.rng = rng
        self.occlusal_v = rng.uniform(0.52, 0.58)        # bite line at the midline
        self.smile = rng.uniform(0.1, 0.55)                # its upward curve; chin-down exaggerates it
        self.palate_v = rng.uniform(0.34, 0.45)
        self.palate_tilt = rng.normal(0, 0.02)
        self.gain = rng.uniform(0.8, 1.2, size=10)         # per-structure contrast jitter
        self.bone = smooth_field(rng, (48, 96), 1.0)       # trabecular texture
        self.soft = smooth_field(rng, (6, 12), 1.0)        # slow exposure / soft-tissue variation
        self.sinus = [self._sinus(side) for side in (LEFT, RIGHT)]

    def occlusal(self, u):
        return self.occlusal_v - self.smile * (u - 0.5) ** 2

    def palate(self, u):
        return self.palate_v + self.palate_tilt * (u - 0.5)

    def _sinus(self, side):
        r = self.rng
        u0, u1 = r.uniform(*SINUS["lateral_wall_u"]), r.uniform(*SINUS["medial_wall_u"])
        roof, floor = r.uniform(*SINUS["roof_v"]), r.uniform(*SINUS["floor_v"])
        if r.random() < SINUS["p_hypoplasia"]:       # an underdeveloped lobe: narrow and shallow
            u1, floor = u1 - r.uniform(0.03, 0.06), floor - r.uniform(0.02, 0.04)
        # the outline is displaced by direction: low harmonics (lobulation) scaled to the lobe so
        # small lobes stay in one piece, plus recesses -- alveolar (down, between the roots),
        # zygomatic (up and lateral), tuberosity (down and lateral) -- bulging out of it
        reach = min((u1 - u0) * ASPECT, floor - roof) / 2
        harmonics = [(k, r.uniform(*SINUS["lobulation"]) * min(reach / 0.12, 1.0), r.uniform(0, 2 * np.pi))
                     for k in (2, 3, 4)]
        directions = (np.pi / 2, -2.4, 2.5)
        recesses = [(directions[r.integers(3)] + r.normal(0, 0.3), r.uniform(0.2, 0.45), r.uniform(0.02, 0.045))
                    for _ in range(r.integers(1, 3)) if r.random() < SINUS["p_recess"]]
        kinds = list(SINUS["opacification"])
        return dict(
            u0=u0, u1=u1, roof=roof, floor=floor, centre=((u0 + u1) / 2, (roof + floor) / 2),
            harmonics=harmonics, recesses=recesses,
            roof_peak=r.uniform(-0.4, 0.3), roof_drop=r.uniform(0.02, 0.16),
            floor_rise=r.uniform(0.0, 0.12), corner=r.uniform(0.02, 0.05),
            scallop=r.uniform(0.006, 0.028), scallop_phase=r.uniform(0, 1), scallop_n=r.integers(2, 6),
            air=r.uniform(*SINUS["air"]), roof_edge=r.uniform(*SINUS["roof_edge"]),
            floor_edge=r.uniform(*SINUS["floor_edge"]), floor_line=r.uniform(0.03, 0.1),
            roof_line=r.uniform(0.0, 0.03), lateral_line=r.uniform(0.02, 0.08), medial_line=r.uniform(0.0, 0.05),
            septum=r.uniform(0.15, 0.85) if r.random() < SINUS["p_septum"] else None,
            septum_height=r.uniform(0.25, 1.0), septum_lean=r.normal(0, 0.01), septum_bone=r.uniform(0.05, 0.14),
            opacification=kinds[r.choice(len(kinds), p=list(SINUS["opacification"].values()))],
            mucosa=r.uniform(0.02, 0.07), mucosa_direction=r.uniform(0, 2 * np.pi), opaque=r.uniform(0.45, 0.85),
            cyst_u=r.uniform(0.25, 0.75), cyst_r=r.uniform(0.025, 0.07), fluid=r.uniform(0.2, 0.7),
        )


def sinus_floor(s, u):
    """(t, floor v) of a lobe before scalloping; t runs from -1 (lateral wall) to 1 (medial)."""
    t = (u - s["u0"]) / (s["u1"] - s["u0"]) * 2 - 1
    return t, s["floor"] - s["floor_rise"] * t ** 2


def lobe_angle(s, U, V):
    """Direction of each point seen from the lobe centre, in left-side coordinates: 0 points
    medially, pi / 2 down towards the teeth, +-pi laterally."""
    return np.arctan2(V - s["centre"][1], (U - s["centre"][0]) * ASPECT)


def outline_bulge(s, U, V):
    """How far (heights) the outline is pushed outwards in each point's direction."""
    angle = lobe_angle(s, U, V)
    bulge = sum(a * np.cos(k * angle + phase) for k, a, phase in s["harmonics"])
    for direction, width, depth in s["recesses"]:
        off = (angle - direction + np.pi) % (2 * np.pi) - np.pi
        bulge = bulge + depth * np.exp(-(off / width) ** 2)
    return bulge


def sinus_distance(s, U, V):
    """Signed distance (heights) to one sinus lobe in left-side coordinates; also its parts."""
    t, floor = sinus_floor(s, U)
    roof = s["roof"] + s["roof_drop"] * ((t - s["roof_peak"]) / (1 + abs(s["roof_peak"]))) ** 2
    # the floor dips between the molar roots: arcs of |sin|
    floor = floor - s["scallop"] * np.abs(np.sin(np.pi * (s["scallop_n"] * (t + 1) / 2 + s["scallop_phase"])))
    # the bulge shifts every wall alike, so the soft union below moves by exactly that much
    bulge = outline_bulge(s, U, V)
    d_roof, d_floor = V - roof + bulge, floor - V + bulge
    d_side = (1 - np.abs(t)) * (s["u1"] - s["u0"]) / 2 * ASPECT + bulge
    inside = smooth_min(smooth_min(d_roof, d_floor, s["corner"]), d_side, s["corner"])
    return inside, d_roof, d_floor, d_side


# ---------------------------------------------------------------------------------------------
# anatomy: one function per structure, each adding its attenuation layer

def soft_tissue(cv, p):
    """Head and neck soft tissue: brightest mid-face, fading to the upper corners and the neck."""
    U, V = cv.U, cv.V
    head = smoothstep(0.55 - np.hypot((U - 0.5) * ASPECT * 0.62, (V - 0.55) * 1.1), 0.5)
    cv.add(np.s_[:, :], (0.16 + 0.1 * head) * (1 + 0.15 * sample(p.soft, U, V)))


def cervical_spine(cv, p):
    """Blurred ghosts of the cervical vertebrae at both edges and faintly over the front teeth."""
    r = p.rng
    U, V = cv.U, cv.V
    period, phase = r.uniform(0.12, 0.17), r.uniform(0, 1)
    segments = 0.9 + 0.1 * np.cos(2 * np.pi * (V / period + phase))
    for side, edge in ((LEFT, r.uniform(0.0, 0.03)), (RIGHT, r.uniform(0.0, 0.03))):
        Us = U if side == LEFT else 1 - U
        column = smoothstep((0.04 + edge - Us) * ASPECT, 0.1) * smoothstep(V - 0.35, 0.3)
        cv.add(np.s_[:, :], r.uniform(0.06, 0.14) * column * segments)
    centre = smoothstep(0.08 - np.abs(U - 0.5) * ASPECT, 0.12) * smoothstep(V - 0.55, 0.2)
    cv.add(np.s_[:, :], r.uniform(0.03, 0.09) * centre)


def mandible(cv, p):
    """Body curving up to the gonial angles, bright lower cortex, rami, condyles, coronoids."""
    r = p.rng
    win = cv.window(0.0, 1.0, 0.1, 1.0)
    U, V = cv.U[win], cv.V[win]
    base, drop = r.uniform(0.86, 0.93), r.uniform(1.0, 1.35)
    lower = base - drop * (U - 0.5) ** 2
    body = np.minimum(lower - V, V - p.occlusal(U) - 0.07)
    cortex = ridge(lower - V - 0.014, 0.012)
    for side in (LEFT, RIGHT):
        Us = U if side == LEFT else 1 - U
        ug = r.uniform(0.1, 0.14)                                  # gonial angle
        vg = base - drop * (ug - 0.5) ** 2 - 0.02
        uc, vc = ug - r.uniform(0.01, 0.04), r.uniform(0.2, 0.26)  # condyle
        ramus = segment(Us, V, (ug + 0.025, vg - 0.03), (uc + 0.008, vc + 0.05), 0.08, 0.035)
        condyle = ellipse(Us, V, uc, vc, r.uniform(0.014, 0.02), r.uniform(0.025, 0.035))
        coronoid = segment(Us, V, (ug + 0.06, vg - 0.1), (ug + 0.09, r.uniform(0.3, 0.36)), 0.05, 0.006)
        behind = (Us - ug) * ASPECT                                # the body ends at the angle
        body = np.where(Us < 0.5, smooth_min(body, behind, 0.05), body)
        body = smooth_max(body, np.maximum(np.maximum(ramus, condyle), coronoid), 0.03)
        cortex = cortex * smoothstep(behind + 0.02, 0.04)
        canal_end = (0.36, base - drop * (0.36 - 0.5) ** 2 - 0.08)
        canal = segment(Us, V, (ug + 0.04, vg - 0.12), canal_end, 0.008, 0.006)
        cv.add(win, -0.04 * smoothstep(canal, 0.01))
    texture = 1 + 0.25 * sample(p.bone, U, V)
    cortex = cortex * smoothstep(body + 0.02, 0.03)
    cv.add(win, p.gain[1] * (0.24 * smoothstep(body, 0.035) * texture + 0.16 * cortex))


def maxilla(cv, p):
    """Alveolar bone around the upper roots and the thin mid-face bone around the sinuses."""
    r = p.rng
    win = cv.window(0.05, 0.95, 0.0, 0.7)
    U, V = cv.U[win], cv.V[win]
    span = np.minimum(U - r.uniform(0.2, 0.24), r.uniform(0.76, 0.8) - U) * ASPECT
    between = smooth_min(V - p.palate(U) + 0.03, p.occlusal(U) - 0.05 - V, 0.03)   # palate to crowns
    alveolar = smoothstep(smooth_min(between, span, 0.05), 0.05)
    midface = smoothstep(smooth_min(smooth_min(V - 0.02, p.occlusal(U) - 0.1 - V, 0.05),
                                    (0.42 - np.abs(U - 0.5)) * ASPECT, 0.1), 0.12)
    texture = 1 + 0.3 * sample(p.bone, U, V)
    cv.add(win, p.gain[2] * texture * (r.uniform(0.08, 0.14) * alveolar + r.uniform(0.06, 0.12) * midface))


def teeth(cv, p):
    """Upper and lower tooth rows: enamel crowns, tapered roots (two for molars), pulp canals."""
    r = p.rng
    widths = np.array([0.026, 0.022, 0.027, 0.03, 0.03, 0.045, 0.043, 0.04]) * r.uniform(0.95, 1.12)
    for side in (LEFT, RIGHT):
        left_edge = 0.5 - np.concatenate([[0], np.cumsum(widths)]) + r.normal(0, 0.004)
        for jaw in ("upper", "lower"):
            for k, w in enumerate(widths):
                if r.random() < (0.4 if k == 7 else 0.04):   # missing teeth, often the third molar
                    continue
                uc = left_edge[k] - w / 2 + r.normal(0, 0.002)
                tooth(cv, p, side, jaw, uc, w * r.uniform(0.82, 0.92), molar=k >= 5)


def tooth(cv, p, side, jaw, uc, w, molar):
    """One tooth in left-side coordinates; the upper roots reach up to the sinus floor."""
    r = p.rng
    sign = -1 if jaw == "upper" else 1                     # direction from crown to root apex
    bite = p.occlusal(uc) + sign * 0.006
    crown_h, root_len = r.uniform(0.055, 0.075), r.uniform(0.12, 0.17)
    if jaw == "upper":   # apices end near the sinus floor, some poking into it
        _, floor = sinus_floor(p.sinus[side], uc)
        root_len = max(min(root_len, abs(floor - bite) - crown_h + r.uniform(-0.03, 0.01)), 0.04)
    crown_c = bite + sign * crown_h / 2
    apex_v = bite + sign * (crown_h + root_len)
    v0, v1 = sorted((bite, apex_v))
    win = cv.side_window(side, uc - w, uc + w, v0 - 0.01, v1 + 0.01)
    U, V = cv.coords(win, side)
    crown = rounded_box(U, V, uc, crown_c, w / 2, crown_h / 2, 0.02)
    neck = bite + sign * crown_h * 0.8
    lean = r.normal(0, 0.006)
    roots = [(uc - w * 0.22, uc - w * 0.28 + lean), (uc + w * 0.22, uc + w * 0.2 + lean)] if molar \
        else [(uc, uc + lean)]
    root_w = w * (0.22 if molar else 0.38) * ASPECT
    root = np.max([segment(U, V, (a, neck), (b, apex_v), root_w, root_w * 0.3) for a, b in roots], axis=0)
    pulp = np.max([segment(U, V, (a, neck - sign * crown_h * 0.3), (b, apex_v - sign * 0.01),
                           root_w * 0.35, root_w * 0.08) for a, b in roots], axis=0)
    filling = 0.3 if r.random() < 0.04 else 0.0            # an occasional metal restoration
    crown_shape = smoothstep(crown, 0.006)
    value = (0.32 + filling) * crown_shape + 0.2 * smoothstep(root, 0.008) * (1 - crown_shape) \
        - 0.07 * smoothstep(pulp, 0.006)
    cv.add(win, p.gain[3] * r.uniform(0.85, 1.15) * value)


def hard_palate(cv, p):
    """The palate band across the lower sinus, with a fainter double image above it."""
    r = p.rng
    win = cv.window(0.08, 0.92, 0.2, 0.6)
    U, V = cv.U[win], cv.V[win]
    thick, ghost = r.uniform(0.008, 0.02), r.uniform(0.025, 0.06)
    level = p.palate(U) - r.uniform(0.0, 0.12) * (U - 0.5) ** 2
    lateral = smoothstep(np.minimum(U - r.uniform(0.16, 0.24), r.uniform(0.76, 0.84) - U) * ASPECT, 0.25)
    band = smoothstep(thick - np.abs(V - level), 0.015)
    double = smoothstep(thick * 0.6 - np.abs(V - level + ghost), 0.02)
    cv.add(win, p.gain[4] * lateral * (r.uniform(0.06, 0.16) * band + r.uniform(0.0, 0.05) * double))


def tongue_and_airway(cv, p):
    """Palatoglossal air gap under the palate, the tongue below it, pharyngeal air over the rami."""
    r = p.rng
    U, V = cv.U, cv.V
    gap = r.uniform(0.0, 0.025) + r.uniform(0.0, 0.5) * (U - 0.5) ** 2
    dorsum = p.palate(U) + 0.02 + gap
    lateral = smoothstep(np.minimum(U - 0.14, 0.86 - U) * ASPECT, 0.15)
    air_gap = smoothstep(np.minimum(V - p.palate(U) - 0.015, dorsum - V), 0.02) * lateral
    tongue = smoothstep(np.minimum(V - dorsum, p.occlusal(U) + 0.05 - V), 0.06) * lateral
    cv.add(np.s_[:, :], p.gain[5] * (-r.uniform(0.04, 0.12) * air_gap + r.uniform(0.02, 0.06) * tongue))
    for side in (LEFT, RIGHT):
        Us = U if side == LEFT else 1 - U
        top = (r.uniform(0.14, 0.26), r.uniform(0.28, 0.4))     # may overlap the posterior sinus wall
        airway = segment(Us, V, top, (top[0] + r.uniform(0.0, 0.05), 0.8), r.uniform(0.015, 0.035), 0.025)
        cv.add(np.s_[:, :], -r.uniform(0.04, 0.14) * smoothstep(airway, r.uniform(0.015, 0.05)))


def zygoma(cv, p):
    """Zygomatic buttress (a J-shaped ridge over the lateral sinus), arch and zygoma body."""
    r = p.rng
    for side in (LEFT, RIGHT):
        win = cv.side_window(side, 0.0, 0.45, 0.05, 0.5)
        U, V = cv.coords(win, side)
        ub, arch_v = r.uniform(0.24, 0.36), r.uniform(0.23, 0.35)
        curve = bezier((ub + 0.01, r.uniform(0.36, 0.42)), (ub - 0.005, arch_v - 0.06), (ub - 0.08, arch_v))
        buttress = polyline(U, V, curve, r.uniform(0.006, 0.014))
        arch = np.minimum(r.uniform(0.015, 0.03) - np.abs(V - arch_v + 0.03 * (U - 0.2) / 0.1),
                          smooth_min(U - r.uniform(0.08, 0.12), ub - 0.06 - U, 0.02) * ASPECT)
        body = ellipse(U, V, ub - 0.03, arch_v - 0.08, r.uniform(0.04, 0.06), r.uniform(0.07, 0.1))
        value = r.uniform(0.06, 0.22) * smoothstep(buttress, 0.015) \
            + r.uniform(0.06, 0.14) * smoothstep(arch, 0.025) + r.uniform(0.05, 0.12) * smoothstep(body, 0.06)
        cv.add(win, p.gain[6] * value)


def nasal_cavity(cv, p):
    """Dark nasal air between the sinuses, with the septum and the inferior turbinates."""
    r = p.rng
    win = cv.window(0.3, 0.7, 0.0, 0.5)
    U, V = cv.U[win], cv.V[win]
    half = r.uniform(0.04, 0.1) * (0.6 + 0.4 * np.clip((V - 0.05) / 0.3, 0, 1))  # pear shape
    cavity = np.minimum((half - np.abs(U - 0.5)) * ASPECT, p.palate(U) - 0.01 - V)
    septum_u = 0.5 + r.normal(0, 0.006) * np.sin(np.pi * V / 0.4)
    septum = smoothstep(r.uniform(0.004, 0.008) - np.abs(U - septum_u) * ASPECT, 0.006)
    turbinate_v = p.palate(0.5) - r.uniform(0.04, 0.07)
    turbinates = sum(smoothstep(ellipse(U, V, 0.5 + s * r.uniform(0.03, 0.045), turbinate_v, 0.022, 0.03), 0.02)
                     for s in (-1, 1))
    fade_up = smoothstep(V - r.uniform(0.06, 0.14), 0.12)
    edge = smoothstep(cavity, r.uniform(0.02, 0.05))
    value = edge * fade_up * (-r.uniform(0.06, 0.16) + 0.07 * septum + 0.06 * turbinates)
    cv.add(win, p.gain[7] * value)


def orbit_floor(cv, p):
    """The orbit floors: thin curved lines above each sinus roof, darker orbit above them."""
    r = p.rng
    for side in (LEFT, RIGHT):
        win = cv.side_window(side, 0.12, 0.5, 0.0, 0.2)
        U, V = cv.coords(win, side)
        cu, lowest = r.uniform(0.24, 0.36), r.uniform(0.04, 0.11)
        floor = lowest - r.uniform(0.6, 1.2) * (U - cu) ** 2
        reach = smoothstep((0.12 - np.abs(U - cu)) * ASPECT, 0.05)
        value = r.uniform(0.05, 0.12) * ridge(V - floor, 0.006) \
            - r.uniform(0.02, 0.09) * smoothstep(floor - V, 0.03)
        cv.add(win, p.gain[8] * reach * value)


def superimpositions(cv, p):
    """Ghost images (blurred, bright, elongated copies of contralateral bone projected higher)
    and air shadows of lips, nose and nasopharynx: bands of any orientation over the upper
    face, some with edges as sharp as a sinus wall. Each patient gets a different set."""
    r = p.rng
    for _ in range(r.integers(1, 5)):
        a = (r.uniform(0.08, 0.92), r.uniform(0.05, 0.5))
        length, angle = r.uniform(0.05, 0.25), r.uniform(0, np.pi)
        b = (a[0] + length * np.cos(angle) / ASPECT, a[1] + length * np.sin(angle))
        band = segment(cv.U, cv.V, a, b, r.uniform(0.015, 0.06), r.uniform(0.01, 0.06))
        sign = 1.0 if r.random() < 0.6 else -1.0
        cv.add(np.s_[:, :], sign * r.uniform(0.03, 0.09) * smoothstep(band, r.uniform(0.006, 0.05)))


def maxillary_sinus(cv, p):
    """The target: two dark air lobes, faint roof, cortical floor, septa, mucosal disease."""
    for side in (LEFT, RIGHT):
        s = p.sinus[side]
        # room for the largest possible bulge (heights, so generous along u)
        margin = 0.03 + sum(a for _, a, _ in s["harmonics"]) + sum(d for _, _, d in s["recesses"])
        win = cv.side_window(side, s["u0"] - margin, s["u1"] + margin, s["roof"] - margin, s["floor"] + margin)
        U, V = cv.coords(win, side)
        inside, d_roof, d_floor, d_side = sinus_distance(s, U, V)
        cv.mask[win] |= inside > 0
        air = smoothstep(d_roof - s["roof_edge"] / 2, s["roof_edge"]) * smoothstep(d_floor, s["floor_edge"]) \
            * smoothstep(d_side, 0.02)
        air = air * (1 - opacification(s, U, V, inside))
        # cortical outline: a clear floor, a faint roof, the posterior (lateral) wall often seen,
        # the medial wall lost in the nasal cavity
        along_sides = smoothstep(np.minimum(d_roof, d_floor) + 0.01, 0.02)
        side_line = np.where(U < s["centre"][0], s["lateral_line"], s["medial_line"])
        walls = s["floor_line"] * ridge(d_floor, 0.007) * smoothstep(d_side + 0.01, 0.02) \
            + s["roof_line"] * ridge(d_roof, 0.008) * smoothstep(d_side, 0.02) \
            + side_line * ridge(d_side, 0.007) * along_sides
        cv.add(win, p.gain[9] * (walls - s["air"] * air + septum(s, U, V, inside)))


def opacification(s, U, V, inside):
    """Fraction of the sinus air replaced by soft tissue or fluid: an uneven mucosal lining, a
    cyst on the floor, a fluid level (a sharp horizontal edge that mimics a floor), or all of it."""
    kind = s["opacification"]
    if kind == "mucosal":   # thickest on one side, e.g. polypoid thickening over the floor
        thickness = s["mucosa"] * (1 + 0.7 * np.cos(lobe_angle(s, U, V) - s["mucosa_direction"]))
        return s["opaque"] * smoothstep(thickness - inside, 0.015)
    if kind == "cyst":
        cu = s["u0"] + s["cyst_u"] * (s["u1"] - s["u0"])
        cyst = ellipse(U, V, cu, s["floor"] - 0.02, s["cyst_r"] / ASPECT, s["cyst_r"])   # round, on the floor
        return s["opaque"] * smoothstep(cyst, 0.015)
    if kind == "fluid":
        level = s["floor"] - s["fluid"] * (s["floor"] - s["roof"])
        return s["opaque"] * smoothstep(V - level, 0.004)
    if kind == "full":
        return np.full_like(U, s["opaque"])
    return np.zeros_like(U)


def septum(s, U, V, inside):
    """An optional bony septum rising from the floor partway into the lobe, or splitting it."""
    if s["septum"] is None:
        return 0.0
    us = s["u0"] + s["septum"] * (s["u1"] - s["u0"])
    top = s["floor"] - s["septum_height"] * (s["floor"] - s["roof"])
    line = segment(U, V, (us, s["floor"] + 0.02), (us + s["septum_lean"], top), 0.006, 0.002)
    return s["septum_bone"] * smoothstep(line, 0.006) * smoothstep(inside + 0.01, 0.02)


ANATOMY = (soft_tissue, cervical_spine, mandible, maxilla, teeth, hard_palate, tongue_and_airway,
           zygoma, nasal_cavity, orbit_floor, superimpositions, maxillary_sinus)


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


def render_float(seed, size):
    """The radiograph as float32 in [0, 1] and the uint8 {0, 1} mask, for case seed `seed`."""
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
    return image.astype(np.float32), cv.mask.astype(np.uint8)


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
    staging, seed, index, size = job
    image, mask = render_float(case_seed(seed, index), size)
    if index % SIXTEEN_BIT_EVERY == SIXTEEN_BIT_EVERY - 1:
        image = np.round(image * 65535).astype(np.uint16)
    else:
        image = np.round(image * 255).astype(np.uint8)
    iio.imwrite(staging / "images" / f"{case_id(index)}.png", image)
    iio.imwrite(staging / "masks" / f"{case_id(index)}.png", mask * np.uint8(255))


def is_interrupted_phantom(out_dir):
    """True if `out_dir` holds only what an interrupted generate() leaves behind (no images/)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or (out_dir / "images").exists():
        return False
    leftovers = {STAGING, "masks", "phantom.json"}
    names = {p.name for p in out_dir.iterdir()}
    return bool(names) and names <= leftovers and (STAGING in names or "phantom.json" in names)


def generate(out_dir, n=300, size=(256, 512), seed=0, workers=None):
    """Write n phantom cases to out_dir/images, out_dir/masks and out_dir/phantom.json.

    Everything is rendered into a staging folder first and moved into place with images/ last,
    so a folder with images/ always holds a complete dataset; an interrupted run leaves only
    leftovers that the next run removes.
    """
    out_dir = Path(out_dir)
    if (out_dir / "images").exists():
        raise UserError(f"--out {out_dir}: already holds images/; choose an empty folder")
    if is_interrupted_phantom(out_dir):
        shutil.rmtree(out_dir / STAGING, ignore_errors=True)
        shutil.rmtree(out_dir / "masks", ignore_errors=True)
        (out_dir / "phantom.json").unlink(missing_ok=True)
    staging = out_dir / STAGING
    try:
        (staging / "images").mkdir(parents=True)
        (staging / "masks").mkdir()
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot write there ({err.strerror}); choose a writable folder")
    workers = workers or len(os.sched_getaffinity(0))
    jobs = [(staging, seed, i, tuple(size)) for i in range(n)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(_write_case, jobs, chunksize=4):
            pass
    info = dict(generator="sinus-wkd panoramic phantom", format_version=FORMAT_VERSION, n=n,
                size=list(size), seed=seed, ids=f"{case_id(0)} .. {case_id(n - 1)}",
                case_seed="numpy SeedSequence([seed, index])", sixteen_bit_every=SIXTEEN_BIT_EVERY,
                mask="union of both sinus lobes, 255 = sinus", sinus=SINUS, acquisition=ACQUISITION,
                structures=[f.__name__ for f in ANATOMY])
    (staging / "phantom.json").write_text(json.dumps(info, indent=1))
    for name in ("phantom.json", "masks", "images"):       # images/ last: it marks completion
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


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    ap = OneLineParser(prog="python -m data.phantom", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder to create images/, masks/ and phantom.json in")
    ap.add_argument("--n", type=int, default=300, help="number of cases (default 300)")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                    help="image height and width in pixels (default 256 512; %d %d per --grid cell)" % GRID_SIZE)
    ap.add_argument("--seed", type=int, default=0, help="dataset seed; case i uses SeedSequence([seed, i])")
    ap.add_argument("--grid", type=Path, help="instead of a dataset, draw a PNG sheet of the first 8 cases")
    args = ap.parse_args(argv)
    if (args.out is None) == (args.grid is None):
        ap.error("give exactly one of --out DIR and --grid PNG")
    if args.n < 1:
        ap.error(f"argument --n: {args.n} must be at least 1")
    if args.size is None:
        args.size = GRID_SIZE if args.grid is not None else (256, 512)
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
    generate(args.out, args.n, tuple(args.size), args.seed)
    print(f"generated {args.n} phantom cases at {args.size[0]}x{args.size[1]} (seed {args.seed}) "
          f"in {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
