"""The target structure: the maxillary sinus lobes, their exact outline (the mask) and their disease.

Each patient gets two independently drawn lobes. The mask is the union of the two lobes,
evaluated exactly (no antialiasing) from the same implicit shape that darkens the image. The
sinuses are deliberately hard to see and vary a lot from patient to patient, so that learning
their outline takes many examples: low air contrast, faint roofs, frequent mucosal thickening,
cysts, fluid levels or full opacification, lobulated outlines with recesses and septa, and
hypoplastic lobes.
"""
import numpy as np

from .shapes import ASPECT, LEFT, RIGHT, ellipse, ridge, segment, smooth_min, smoothstep

# Per-patient ranges of the target structure (also recorded in phantom.json).
SINUS = dict(
    lateral_wall_u=(0.185, 0.25), medial_wall_u=(0.37, 0.43), roof_v=(0.10, 0.155),
    floor_v=(0.35, 0.46), air=(0.04, 0.16), roof_edge=(0.015, 0.04), floor_edge=(0.008, 0.02),
    lobulation=(0.0, 0.035), p_recess=0.6, p_hypoplasia=0.2, p_septum=0.45,
    opacification=dict(none=0.22, mucosal=0.33, cyst=0.12, fluid=0.13, full=0.20),
)


def random_lobe(r):
    """Shape, walls and disease of one sinus lobe (left-side coordinates), drawn from the generator r."""
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


def maxillary_sinus(cv, p):
    """The target: two dark air lobes, faint roof, cortical floor, septa, mucosal disease."""
    for side in (LEFT, RIGHT):
        s = p.sinus[side]
        # room for the largest possible bulge (heights, so generous along u)
        margin = 0.03 + sum(a for _, a, _ in s["harmonics"]) + sum(d for _, _, d in s["recesses"])
        win = cv.side_window(side, s["u0"] - margin, s["u1"] + margin, s["roof"] - margin, s["floor"] + margin)
        U, V = cv.coords(win, side)
        inside, d_roof, d_floor, d_side = sinus_distance(s, U, V)
        cv.mask[win][inside > 0] = side + 1
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
