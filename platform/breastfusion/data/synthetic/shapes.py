"""Drawing helpers shared by the DM and US renderers: noise fields, lesion outlines, dots."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from breastfusion.data.imaging import box_of

Box = tuple[int, int, int, int]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def wrap_angle(x: np.ndarray) -> np.ndarray:
    """Angles wrapped to [-pi, pi)."""
    return (x + np.pi) % (2 * np.pi) - np.pi


def _interp_matrix(n: int, f: int, m: int) -> np.ndarray:
    """(n x m) Gaussian interpolation weights from m coarse knots spaced f pixels apart."""
    pos = (np.arange(n, dtype=np.float32) + 0.5) / f + 1.0
    w = np.exp(-0.5 * ((pos[:, None] - np.arange(m, dtype=np.float32)[None, :]) / 0.75) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with features about ``cell`` pixels across.

    Coarse white noise is upsampled with two small matrix products (smooth, no interpolation
    artefacts, and ~10x cheaper than ``ndimage.zoom``).
    """
    h, w = shape
    f = max(1, int(round(cell)))
    ch, cw = -(-h // f) + 3, -(-w // f) + 3
    coarse = rng.standard_normal((ch, cw)).astype(np.float32)
    out = _interp_matrix(h, f, ch) @ coarse @ _interp_matrix(w, f, cw).T
    out -= out.mean()
    return out / (out.std() + 1e-6)


def aniso_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]
) -> np.ndarray:
    out = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    out -= out.mean()
    return out / (out.std() + 1e-6)


def smooth1d(rng: np.random.Generator, n: int, cell: float) -> np.ndarray:
    k = max(2, int(math.ceil(n / max(cell, 1.0))) + 2)
    knots = rng.standard_normal(k)
    return np.interp(np.linspace(0, k - 1, n), np.arange(k), knots).astype(np.float32)


@dataclass(frozen=True)
class Shape:
    """A lesion outline in polar form, shared by all views of one patient."""

    ratio: float  # minor/major axis of the base ellipse
    harm_amp: np.ndarray
    harm_phase: np.ndarray
    ang_angles: np.ndarray  # angular (corner) points of the margin
    ang_amp: float
    spic_angles: np.ndarray
    spic_len: np.ndarray  # in units of the radius
    angle: float


def lesion_shape(rng: np.random.Generator, s: float, *, us: bool) -> Shape:
    """The outline of a lesion of suspicion ``s``: more lobulation, corners and spicules.

    Spicules (DM only) start at s = 0.5 and grow in number and length with ``s``: they are
    the coarsest malignant sign, still visible when a mammogram is shrunk to 48 px.
    """
    k = np.arange(2, 9)
    amp = (0.01 + 0.12 * s) * rng.uniform(0.3, 1.0, k.size) / (k / 2.0)
    amp[-3:] += 0.035 * s * rng.uniform(0.5, 1.0, 3)  # microlobulation
    n_ang = int(round(2 + 5 * s)) if s > 0.35 else 0
    n_spic = 0 if us or s <= 0.5 else int(round(6 + 24 * (s - 0.5)))
    return Shape(
        ratio=float(rng.uniform(0.6, 0.95)),
        harm_amp=amp,
        harm_phase=rng.uniform(0, 2 * np.pi, k.size),
        ang_angles=rng.uniform(-np.pi, np.pi, n_ang),
        ang_amp=0.22 * max(0.0, s - 0.35),
        spic_angles=np.sort(rng.uniform(-np.pi, np.pi, n_spic)),
        spic_len=rng.uniform(1.5, 3.0, n_spic) * (0.5 + s),
        angle=float(rng.uniform(-np.pi, np.pi)),
    )


def _outline(theta: np.ndarray, sh: Shape) -> np.ndarray:
    """Boundary radius (in units of the ellipse radius) as a function of angle."""
    r = np.ones_like(theta)
    for j, (a, ph) in enumerate(zip(sh.harm_amp, sh.harm_phase, strict=True)):
        r += a * np.cos((j + 2) * theta + ph)
    for ang in sh.ang_angles:
        d = np.abs(wrap_angle(theta - ang))
        r += sh.ang_amp * np.clip(1.0 - d / 0.45, 0.0, None)
    return r


def blob(
    dy: np.ndarray,
    dx: np.ndarray,
    a: float,
    b: float,
    angle: float,
    sh: Shape,
    soft: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft lesion mask on a local grid; returns (mask, normalised radius, outline radius)."""
    c, s_ = math.cos(angle), math.sin(angle)
    u = dx * c + dy * s_
    w = -dx * s_ + dy * c
    un, wn = u / a, w / b
    rho = np.sqrt(un * un + wn * wn)
    theta = np.arctan2(wn, un)
    rb = _outline(theta, sh)
    mask = sigmoid((rb - rho) * min(a, b) / max(soft, 0.3))
    return mask.astype(np.float32), rho, rb


def patch(cy: float, cx: float, ext: float, h: int, w: int):
    """(slices, dy, dx): the window of half-size ``ext`` around a centre, clipped to h x w."""
    y0, y1 = max(0, int(cy - ext)), min(h, int(cy + ext) + 2)
    x0, x1 = max(0, int(cx - ext)), min(w, int(cx + ext) + 2)
    dy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5) - cy
    dx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5) - cx
    return (slice(y0, y1), slice(x0, x1)), dy, dx


def bbox(mask: np.ndarray, thr: float) -> Box | None:
    return box_of(mask > thr)


def dots(
    img: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    sigmas: np.ndarray,
    amps: np.ndarray,
) -> Box | None:
    """Add Gaussian dots (calcifications); returns their bounding box."""
    h, w = img.shape
    ext = float(np.max(sigmas)) * 3 + 1
    y0, y1 = max(0, int(ys.min() - ext)), min(h, int(ys.max() + ext) + 2)
    x0, x1 = max(0, int(xs.min() - ext)), min(w, int(xs.max() + ext) + 2)
    if y0 >= y1 or x0 >= x1:
        return None
    yy = np.arange(y0, y1, dtype=np.float32)[None, :, None] + 0.5
    xx = np.arange(x0, x1, dtype=np.float32)[None, None, :] + 0.5
    d2 = (yy - ys[:, None, None]) ** 2 + (xx - xs[:, None, None]) ** 2
    layer = (amps[:, None, None] * np.exp(-d2 / (2 * sigmas[:, None, None] ** 2))).sum(0)
    img[y0:y1, x0:x1] += layer
    return bbox(np.pad(layer, ((y0, h - y1), (x0, w - x1))), 0.1)
