"""Mammogram (DM) rendering: breast silhouette, fibroglandular tissue, the patient's finding.

Portrait images (``size`` x [1, 1 + jitter] high): a half-ellipse breast on the chest wall
(taller on MLO, with a bright pectoral-muscle triangle), anisotropic glandular texture
thresholded to the patient's density, then the finding of the lesion-side views (mass and/or
calcification cluster, shaped by the suspicion ``s``) and scattered benign calcifications.
L images have the chest wall on the left edge; R images are mirrored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from breastfusion.data.imaging import union_boxes
from breastfusion.data.synthetic.params import (
    DENSITY_FRACTION,
    DENSITY_MASKING,
    MIN_SIZE,
    SynthParams,
)
from breastfusion.data.synthetic.plan import ImagePlan, PatientPlan
from breastfusion.data.synthetic.shapes import (
    Box,
    Shape,
    aniso_noise,
    bbox,
    blob,
    dots,
    lesion_shape,
    patch,
    sigmoid,
    smooth1d,
    smooth_noise,
    wrap_angle,
)


@dataclass(frozen=True)
class _Breast:
    """Where the breast lies in one view (pixels, chest wall at x = 0)."""

    cy: float  # vertical centre of the half ellipse
    b: float  # its vertical semi-axis
    a: float  # its horizontal semi-axis (depth from the chest wall)
    px: float  # pectoral triangle (MLO only; 0 on CC)
    py: float
    sc: float  # pixel scale relative to a 256 px image
    inside: np.ndarray  # 1 inside the breast, 0 outside (soft at the skin line)


def render_dm(
    rng: np.random.Generator, pt: PatientPlan, im: ImagePlan, prm: SynthParams, size: int
) -> tuple[np.ndarray, Box | None]:
    """One mammogram in [0, 1] and the box of its finding (None when no finding is drawn)."""
    j = prm.size_jitter
    h = max(MIN_SIZE, round(size * rng.uniform(1.0, 1.0 + j)))
    w = max(MIN_SIZE, round(size * rng.uniform(1.0 - j, 1.0 - j / 5)))
    mlo = im.view == "MLO"
    # Skin and trabecular thickening: an associated sign of a suspicious finding, on the
    # finding's side only; it runs along the whole skin line, so it survives any downsizing.
    thick = max(0.0, pt.dm_s - 0.5) / 0.5 if im.has_lesion else 0.0
    img, geo = _breast(rng, h, w, mlo, pt.density, thick)
    box = _dm_lesion(img, pt, mlo, prm, geo) if im.has_lesion else None
    if pt.benign_calcs:
        n = int(rng.integers(2, 6))
        ty = geo.cy + geo.b * rng.uniform(-0.7, 0.7, n)
        tx = (
            geo.a
            * rng.uniform(0.15, 0.8, n)
            * np.sqrt(np.clip(1 - ((ty - geo.cy) / geo.b) ** 2, 0, 1))
        )
        dots(
            img,
            ty.astype(np.float32),
            tx.astype(np.float32),
            np.full(n, max(0.7, 1.8 * geo.sc), np.float32),
            rng.uniform(0.2, 0.35, n).astype(np.float32),
        )
    # Detector noise varies between units (per patient) and exposures (per image). It also
    # sets most of a PNG's entropy, so file sizes vary far more than a lesion can make them.
    noise = prm.dm_noise * pt.noise_gain * rng.uniform(0.8, 1.25)
    img += rng.normal(0.0, noise, img.shape).astype(np.float32) * (0.4 + 0.6 * geo.inside)
    img = np.clip(img + 0.03, 0.0, 1.0)
    if im.laterality == "R":
        img = img[:, ::-1]
        if box is not None:
            box = (w - box[2], box[1], w - box[0], box[3])
    return np.ascontiguousarray(img), box


def _breast(
    rng: np.random.Generator, h: int, w: int, mlo: bool, density: int, thick: float
) -> tuple[np.ndarray, _Breast]:
    """(image, geometry) of a view without its finding; ``thick`` in [0, 1] thickens the
    skin."""
    sc = h / 256.0
    y = np.arange(h, dtype=np.float32)[:, None] + 0.5
    x = np.arange(w, dtype=np.float32)[None, :] + 0.5
    if mlo:
        cy, b, a = (
            h * rng.uniform(0.52, 0.58),
            h * rng.uniform(0.56, 0.62),
            w * rng.uniform(0.74, 0.9),
        )
    else:
        cy, b, a = (
            h * rng.uniform(0.46, 0.54),
            h * rng.uniform(0.40, 0.46),
            w * rng.uniform(0.70, 0.88),
        )
    a_y = a * (1.0 + 0.04 * smooth1d(rng, h, max(4.0, h / 6)))[:, None]
    r2 = (x / a_y) ** 2 + ((y - cy) / b) ** 2
    r = np.sqrt(r2)
    edge = np.clip((1.0 - r) * min(a, b) / max(1.5 * sc, 0.6), 0.0, 1.0)
    t = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))

    field_ = 0.85 * smooth_noise(rng, (h, w), h / 12) + 0.3 * aniso_noise(
        rng, (h, w), (max(0.5, 1.2 * sc), max(1.0, 5.0 * sc))
    )
    field_ /= field_.std() + 1e-6
    thr = float(ndtri(1.0 - DENSITY_FRACTION[density]))
    wreg = np.exp(-(((y - cy) / (0.8 * b)) ** 2)) * np.clip((1.0 - r) / 0.15, 0.0, 1.0)
    gland = sigmoid((field_ - thr) / 0.55) * wreg
    img = edge * (0.14 + 0.2 * np.sqrt(t)) + gland * edge * 0.09 * (0.5 + 0.5 * t)
    skin_w = max(1.2 * sc, 0.5) + thick * 0.06 * h
    img += (0.05 + 0.35 * thick) * edge * np.exp(-(((1.0 - r) * min(a, b) / skin_w) ** 2))

    px = py = 0.0
    if mlo:
        px, py = w * rng.uniform(0.28, 0.42), h * rng.uniform(0.5, 0.75)
        pm = np.clip((1.0 - x / px - y / py) * min(px, py) / max(1.5 * sc, 0.6), 0.0, 1.0)
        img = img * (1.0 - pm) + pm * (0.56 + 0.03 * field_)
    return img, _Breast(cy, b, a, px, py, sc, edge)


def _dm_lesion(
    img: np.ndarray, pt: PatientPlan, mlo: bool, prm: SynthParams, geo: _Breast
) -> Box | None:
    """Draw the patient's DM finding (same lesion, view-specific position); returns its box."""
    h = img.shape[0]
    lrng = np.random.default_rng(pt.lesion_seed)  # same draws for every view of the patient
    s = pt.dm_s
    sh = lesion_shape(lrng, s, us=False)
    depth, vert = lrng.uniform(0.3, 0.6), lrng.uniform(-0.45, 0.45)
    radius = max(1.5, lrng.uniform(0.12, 0.18) * h)  # the same size range for every label
    calc_pos = lrng.uniform(-0.6, 0.6, 2)
    vrng = np.random.default_rng([pt.lesion_seed, 1 + int(mlo)])  # per-view jitter
    ly = geo.cy + geo.b * (vert * 0.8 - (0.1 if mlo else 0.0))
    half = math.sqrt(max(0.05, 1 - ((ly - geo.cy) / geo.b) ** 2))
    lx = depth * geo.a * half
    if mlo and ly < geo.py:
        lx = max(lx, geo.px * (1 - ly / geo.py) + 0.08 * geo.a)
    lx = min(lx, 0.75 * geo.a * half)
    angle = sh.angle + vrng.uniform(-0.4, 0.4)
    boxes = []
    if "mass" in pt.dm_finding:
        contrast = prm.dm_mass_contrast * (1.0 - prm.dm_masking * DENSITY_MASKING[pt.density])
        if pt.dm_masked:
            contrast *= 0.15
        boxes.append(_mass(img, geo.inside, (ly, lx), radius, angle, sh, s, contrast))
    if "calc" in pt.dm_finding:
        alone = "mass" not in pt.dm_finding
        centre = (ly + alone * calc_pos[0] * radius, lx + alone * calc_pos[1] * radius)
        boxes.append(_calcs(img, centre, radius, s, prm.dm_calc_amplitude, lrng, vrng))
    return union_boxes(b for b in boxes if b is not None)


def _mass(
    img: np.ndarray,
    inside: np.ndarray,
    centre: tuple[float, float],
    radius: float,
    angle: float,
    sh: Shape,
    s: float,
    contrast: float,
) -> Box | None:
    """Add a mass: at low ``s`` an oval, circumscribed, low-density (fat-containing) mass with
    a thin bright capsule; at high ``s`` an irregular, indistinct, spiculated high-density one.
    Margin blur and spicule width scale with the radius, not the pixel, so the margin still
    reads at 48 px. ``contrast`` (density masking) alone decides whether it counts as drawn,
    so visibility does not depend on ``s``. Returns its box, or None."""
    h, w = img.shape
    soft = max(0.4, radius * (0.03 + 0.15 * s))
    ext = radius * (1.3 + (float(sh.spic_len.max()) if sh.spic_len.size else 0.0)) + 3 * soft + 2
    sl, dy, dx = patch(centre[0], centre[1], ext, h, w)
    ratio = sh.ratio if s >= 0.5 else 0.5 + 0.5 * sh.ratio  # benign masses are round/oval
    mask, rho, rb = blob(
        dy, dx, radius / math.sqrt(ratio), radius * math.sqrt(ratio), angle, sh, soft
    )
    if sh.spic_angles.size:
        rho = np.sqrt(dy * dy + dx * dx)
        th = np.arctan2(dy, dx)
        spic = np.zeros_like(mask)
        for ang, length in zip(sh.spic_angles + angle, sh.spic_len, strict=True):
            dth = wrap_angle(th - ang)
            along = rho * np.cos(dth)
            lateral = rho * np.abs(np.sin(dth))
            prof = np.clip(1.0 - (along - 0.7 * radius) / (length * radius + 1e-3), 0.0, 1.0)
            width = max(0.6, 0.2 * radius) * (0.4 + 0.6 * prof)  # tapering
            spic = np.maximum(spic, np.exp(-((lateral / width) ** 2)) * prof * (along > 0))
        mask = np.maximum(mask, spic)
    capsule = np.exp(-(((rho - rb) / 0.12) ** 2)) * max(0.0, 1.0 - 2.0 * s)
    mask *= inside[sl]  # spicules stop at the skin
    density = 2.5 * s - 0.5 - 1.2 * max(0.0, 0.3 - s)  # < 0: fat-containing, > 0: dense
    img[sl] += contrast * (density * mask + 0.6 * capsule)
    if contrast <= 0.02:
        return None
    bb = bbox(mask, 0.3)
    if bb is None:
        return None
    return (bb[0] + sl[1].start, bb[1] + sl[0].start, bb[2] + sl[1].start, bb[3] + sl[0].start)


def _calcs(
    img: np.ndarray,
    centre: tuple[float, float],
    radius: float,
    s: float,
    amplitude: float,
    lrng: np.random.Generator,
    vrng: np.random.Generator,
) -> Box | None:
    """Add a calcification cluster; returns its box.

    Low ``s``: a few coarse round calcifications (benign, "popcorn"); high ``s``: many fine
    pleomorphic ones along branching lines (malignant, segmental), which merge into bright
    streaks when the image is shrunk. In between, some of each.
    """
    h = img.shape[0]
    n_coarse = int(round(5 * np.clip((0.7 - s) / 0.5, 0.0, 1.0)))
    n_fine = int(round(40 * np.clip((s - 0.3) / 0.6, 0.0, 1.0)))
    n_coarse = max(n_coarse, 2 - n_fine)
    cyc, cxc = centre
    ys = [cyc + vrng.uniform(-1.2, 1.2, n_coarse) * radius]
    xs = [cxc + vrng.uniform(-1.2, 1.2, n_coarse) * radius]
    sig = [np.full(n_coarse, max(0.8, 0.011 * h))]
    amps = [amplitude * lrng.uniform(0.7, 1.0, n_coarse)]
    if n_fine:
        n_br = int(lrng.integers(2, 5))
        dirs = lrng.uniform(-np.pi, np.pi, n_br)[lrng.integers(0, n_br, n_fine)]
        t_ = lrng.uniform(0.0, 1.0, n_fine) * lrng.uniform(0.07, 0.12) * h
        ys.append(cyc + t_ * np.sin(dirs) + vrng.normal(0, 0.004 * h, n_fine))
        xs.append(cxc + t_ * np.cos(dirs) + vrng.normal(0, 0.004 * h, n_fine))
        sig.append(max(0.4, 0.0035 * h) * lrng.uniform(0.7, 1.6, n_fine))  # pleomorphic
        amps.append(amplitude * lrng.uniform(0.6, 1.0, n_fine))
    return dots(
        img,
        np.concatenate(ys).astype(np.float32),
        np.concatenate(xs).astype(np.float32),
        np.concatenate(sig).astype(np.float32),
        np.concatenate(amps).astype(np.float32),
    )
