"""The rest of the anatomy: the patient's random layout and one function per structure.

Every structure adds a smooth attenuation layer to the canvas (bone and teeth add brightness,
air subtracts it), each with soft edges and per-patient random size, asymmetry, position and
contrast: a palate band across the sinus floor, zygomatic bone, airway and nasal air
overlapping the sinus walls, and ghost images make the target (data.sinus) hard to see.
ANATOMY lists the structures in drawing order; that order fixes what a seed draws.
"""
import numpy as np

from .shapes import ASPECT, LEFT, RIGHT, bezier, ellipse, polyline, ridge, rounded_box, sample, segment, smooth_field, \
    smooth_max, smooth_min, smoothstep
from .sinus import maxillary_sinus, random_lobe, sinus_floor

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
        self.gain = rng.uniform(0.65, 1.35, size=10)       # per-structure contrast jitter
        self.bone = smooth_field(rng, (48, 96), 1.0)       # trabecular texture
        self.soft = smooth_field(rng, (6, 12), 1.0)        # slow exposure / soft-tissue variation
        self.sinus = [random_lobe(rng) for _ in (LEFT, RIGHT)]

    def occlusal(self, u):
        return self.occlusal_v - self.smile * (u - 0.5) ** 2

    def palate(self, u):
        return self.palate_v + self.palate_tilt * (u - 0.5)


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


ANATOMY = (soft_tissue, cervical_spine, mandible, maxilla, teeth, hard_palate, tongue_and_airway,
           zygoma, nasal_cavity, orbit_floor, superimpositions, maxillary_sinus)
