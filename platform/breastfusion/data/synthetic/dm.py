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
    aniso_noise,
    bbox,
    blob,
    dots,
    lesion_shape,
    patch,
    sigmoid,
    smooth1d,
    smooth_noise,
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


def render_dm(
    rng: np.random.Generator, pt: PatientPlan, im: ImagePlan, prm: SynthParams, size: int
) -> tuple[np.ndarray, Box | None]:
    """One mammogram in [0, 1] and the box of its finding (None when no finding is drawn)."""
    j = prm.size_jitter
    h = max(MIN_SIZE, round(size * rng.uniform(1.0, 1.0 + j)))
    w = max(MIN_SIZE, round(size * rng.uniform(1.0 - j, 1.0 - j / 5)))
    mlo = im.view == "MLO"
    img, edge, geo = _breast(rng, h, w, mlo, pt.density)
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
    img += rng.normal(0.0, prm.dm_noise, img.shape).astype(np.float32) * (0.4 + 0.6 * edge)
    img = np.clip(img + 0.03, 0.0, 1.0)
    if im.laterality == "R":
        img = img[:, ::-1]
        if box is not None:
            box = (w - box[2], box[1], w - box[0], box[3])
    return np.ascontiguousarray(img), box


def _breast(
    rng: np.random.Generator, h: int, w: int, mlo: bool, density: int
) -> tuple[np.ndarray, np.ndarray, _Breast]:
    """(image, breast-edge weight, geometry) of a lesion-free view."""
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
    img = edge * (0.14 + 0.2 * np.sqrt(t)) + gland * edge * 0.24 * (0.5 + 0.5 * t)
    img += 0.05 * edge * np.exp(-(((1.0 - r) * min(a, b) / max(1.2 * sc, 0.5)) ** 2))  # skin

    px = py = 0.0
    if mlo:
        px, py = w * rng.uniform(0.28, 0.42), h * rng.uniform(0.5, 0.75)
        pm = np.clip((1.0 - x / px - y / py) * min(px, py) / max(1.5 * sc, 0.6), 0.0, 1.0)
        img = img * (1.0 - pm) + pm * (0.56 + 0.03 * field_)
    return img, edge, _Breast(cy, b, a, px, py, sc)


def _dm_lesion(
    img: np.ndarray, pt: PatientPlan, mlo: bool, prm: SynthParams, geo: _Breast
) -> Box | None:
    """Draw the patient's DM finding (same lesion, view-specific position); returns its box."""
    h, w = img.shape
    lrng = np.random.default_rng(pt.lesion_seed)  # same draws for every view of the patient
    s = pt.dm_s
    sh = lesion_shape(lrng, s, us=False)
    depth, vert = lrng.uniform(0.3, 0.65), lrng.uniform(-0.45, 0.45)
    radius_frac = lrng.uniform(0.04, 0.07)
    calc_pos = lrng.uniform(-0.5, 0.5, 2)
    vrng = np.random.default_rng([pt.lesion_seed, 1 + int(mlo)])  # per-view jitter
    ly = geo.cy + geo.b * (vert * 0.8 - (0.1 if mlo else 0.0))
    half = math.sqrt(max(0.05, 1 - ((ly - geo.cy) / geo.b) ** 2))
    lx = depth * geo.a * half
    if mlo and ly < geo.py:
        lx = max(lx, geo.px * (1 - ly / geo.py) + 0.08 * geo.a)
    lx = min(lx, 0.8 * geo.a * half)
    radius = max(1.5, radius_frac * h)
    angle = sh.angle + vrng.uniform(-0.4, 0.4)
    boxes = []
    if "mass" in pt.dm_finding:
        contrast = prm.dm_mass_contrast * (0.75 + 0.5 * s)
        contrast *= 1.0 - prm.dm_masking * DENSITY_MASKING[pt.density]
        if pt.dm_masked:
            contrast *= 0.2
        bb = _mass(img, (ly, lx), radius, angle, sh, s, contrast, geo.sc)
        if bb is not None:
            boxes.append(bb)
    if "calc" in pt.dm_finding:
        alone = "mass" not in pt.dm_finding
        centre = (ly + alone * calc_pos[0] * radius, lx + alone * calc_pos[1] * radius)
        bb = _calcs(img, centre, radius, s, prm.dm_calc_amplitude, geo.sc, lrng, vrng)
        if bb is not None:
            boxes.append(bb)
    return union_boxes(boxes)


def _mass(
    img: np.ndarray,
    centre: tuple[float, float],
    radius: float,
    angle: float,
    sh,
    s: float,
    contrast: float,
    sc: float,
) -> Box | None:
    """Add a mass (oval and circumscribed at low ``s``, spiculated at high); its box."""
    h, w = img.shape
    soft = max(0.4, (0.5 + 2.0 * s) * sc)
    ext = radius * (1.25 + (float(sh.spic_len.max()) if sh.spic_len.size else 0.0)) + 3 * soft + 2
    sl, dy, dx = patch(centre[0], centre[1], ext, h, w)
    ra, rb_ = radius / math.sqrt(sh.ratio), radius * math.sqrt(sh.ratio)
    if s < 0.45:  # benign masses are round/oval
        ra, rb_ = radius / math.sqrt(0.5 + 0.5 * sh.ratio), radius * math.sqrt(0.5 + 0.5 * sh.ratio)
    mask, _, _ = blob(dy, dx, ra, rb_, angle, sh, soft)
    if sh.spic_angles.size:
        rho = np.sqrt(dy * dy + dx * dx)
        th = np.arctan2(dy, dx)
        width = max(0.5, 1.3 * sc)
        spic = np.zeros_like(mask)
        for ang, length in zip(sh.spic_angles + angle, sh.spic_len, strict=True):
            dth = np.angle(np.exp(1j * (th - ang)))
            along = rho * np.cos(dth)
            lateral = rho * np.abs(np.sin(dth))
            prof = np.clip(1.0 - (along - 0.8 * radius) / (length * radius + 1e-3), 0.0, 1.0)
            spic = np.maximum(spic, np.exp(-((lateral / width) ** 2)) * prof * (along > 0))
        mask = np.maximum(mask, 0.85 * spic)
    img[sl] += contrast * mask
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
    sc: float,
    lrng: np.random.Generator,
    vrng: np.random.Generator,
) -> Box | None:
    """Add a calcification cluster (few round dots at low ``s``; many, pleomorphic, linear)."""
    h = img.shape[0]
    n = 5 + int(round(13 * s))
    spread = max(1.5, h * lrng.uniform(0.015, 0.03) * (1.3 - 0.5 * s))
    cyc, cxc = centre
    if s > 0.65 and lrng.random() < 0.6:  # linear / branching arrangement
        k = lrng.integers(0, 3, n)
        dirs = lrng.uniform(-np.pi, np.pi, 3)[k]
        t_ = lrng.uniform(-1.5, 1.5, n) * spread
        ys = cyc + t_ * np.sin(dirs) + vrng.normal(0, 0.2 * spread, n)
        xs = cxc + t_ * np.cos(dirs) + vrng.normal(0, 0.2 * spread, n)
    else:
        ys = cyc + vrng.normal(0, 0.6 * spread, n)
        xs = cxc + vrng.normal(0, 0.6 * spread, n)
    sig = max(0.45, 0.7 * sc) * (1 + s * lrng.uniform(-0.4, 0.9, n))  # pleomorphic
    amps = amplitude * lrng.uniform(0.6, 1.0, n)
    return dots(
        img,
        ys.astype(np.float32),
        xs.astype(np.float32),
        sig.astype(np.float32),
        amps.astype(np.float32),
    )
