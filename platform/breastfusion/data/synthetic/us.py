"""Ultrasound (US) rendering: tissue layers, the patient's lesion, speckle and screen clutter.

Landscape images: a scan rectangle framed by black margins holding skin, subcutaneous fat, a
wavy glandular layer, retromammary fat, striated pectoral muscle and sometimes a rib with its
shadow; depth attenuation and multiplicative speckle; one hypoechoic lesion whose look follows
the suspicion ``s``; screen clutter outside the lesion box.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from scipy import ndimage

from breastfusion.data.synthetic.overlay import Overlay, clutter
from breastfusion.data.synthetic.params import MIN_SIZE, SynthParams
from breastfusion.data.synthetic.plan import ImagePlan, PatientPlan
from breastfusion.data.synthetic.shapes import (
    Box,
    bbox,
    blob,
    lesion_shape,
    patch,
    sigmoid,
    smooth1d,
    smooth_noise,
)


def render_us(
    rng: np.random.Generator, pt: PatientPlan, im: ImagePlan, prm: SynthParams, size: int
) -> tuple[np.ndarray, Box]:
    """One US image in [0, 1] (H x W, or H x W x 3 for RGB files) and its lesion box."""
    j = prm.size_jitter
    w = max(MIN_SIZE, round(size * rng.uniform(1.0 - j / 5, 1.0 + j)))
    h = max(MIN_SIZE, round(size * rng.uniform(1.0 - j, 1.0 - j / 5)))
    sc = max(size / 256.0, 0.3)
    sx0, sx1 = round(w * rng.uniform(0.10, 0.15)), w - round(w * rng.uniform(0.08, 0.13))
    sy0, sy1 = round(h * rng.uniform(0.08, 0.12)), h - round(h * rng.uniform(0.03, 0.06))
    scan = (sx0, sy0, sx1, sy1)
    tissue = _tissue(rng, sy1 - sy0, sx1 - sx0, sc)
    mask, sl = _lesion(rng, pt, tissue, prm, sc)
    z = (np.arange(sy1 - sy0, dtype=np.float32)[:, None] + 0.5) / (sy1 - sy0)
    tissue *= (1.05 - 0.35 * z).astype(np.float32)  # attenuation after time-gain compensation
    grey = np.zeros((h, w), np.float32)
    grey[sy0:sy1, sx0:sx1] = np.clip(_speckle(rng, tissue, prm, sc), 0.0, 1.0)

    bb = bbox(mask, 0.5) or (0, 0, mask.shape[1], mask.shape[0])
    bx0, by0 = bb[0] + sl[1].start + sx0, bb[1] + sl[0].start + sy0
    bx1, by1 = bb[2] + sl[1].start + sx0, bb[3] + sl[0].start + sy0
    pad = max(1, round(0.08 * max(bx1 - bx0, by1 - by0)))
    box = (max(sx0, bx0 - pad), max(sy0, by0 - pad), min(sx1, bx1 + pad), min(sy1, by1 + pad))

    ov = Overlay(h, w, rgb=im.fmt == "png_rgb")
    clutter(rng, ov, im, scan, box, sc)
    ov.alpha[box[1] : box[3], box[0] : box[2]] = False  # the lesion itself is never covered
    if ov.rgb:
        out = np.repeat(grey[:, :, None], 3, axis=2)
        out[ov.alpha] = ov.colour[ov.alpha]
    else:
        out = grey
        out[ov.alpha] = ov.colour[ov.alpha].mean(axis=1)
    return out, box


def _tissue(rng: np.random.Generator, sh_: int, sw: int, sc: float) -> np.ndarray:
    """Echo levels of the lesion-free scan (sh_ x sw): layers, texture, sometimes a rib."""
    z = (np.arange(sh_, dtype=np.float32)[:, None] + 0.5) / sh_
    zb2 = rng.uniform(0.13, 0.22) + 0.03 * smooth1d(rng, sw, sw / 4)[None, :]
    zb3 = rng.uniform(0.55, 0.68) + 0.05 * smooth1d(rng, sw, sw / 3)[None, :]
    zb4 = zb3 + rng.uniform(0.07, 0.12)

    def step(zb: np.ndarray | float) -> np.ndarray:
        return sigmoid((z - zb) / 0.012)

    tex = smooth_noise(rng, (sh_, sw), max(2.0, sw / 12))
    fat = 0.26 + 0.05 * tex
    gland = 0.62 * (1.0 + 0.25 * tex)
    stripes = np.sin(2 * np.pi * (z * rng.uniform(14, 22) + 0.15 * tex))
    muscle = 0.42 + 0.1 * stripes
    tissue = 0.85 * (1 - step(0.035)) + step(0.035) * fat
    tissue = tissue * (1 - step(zb2)) + step(zb2) * gland
    tissue = tissue * (1 - step(zb3)) + step(zb3) * fat
    tissue = tissue * (1 - step(zb4)) + step(zb4) * muscle
    tissue = tissue.astype(np.float32)
    if rng.random() < 0.3:  # a rib: bright curved surface and its acoustic shadow
        yy = np.arange(sh_, dtype=np.float32)[:, None] + 0.5
        xx = np.arange(sw, dtype=np.float32)[None, :] + 0.5
        rc, rw = rng.uniform(0.2, 0.8) * sw, rng.uniform(0.12, 0.2) * sw
        top = sh_ * (0.88 + 0.05 * ((xx - rc) / rw) ** 2)
        inside = np.abs(xx - rc) < rw
        tissue += 0.5 * np.exp(-(((yy - top) / max(1.0, 1.5 * sc)) ** 2)) * inside
        tissue *= np.where(inside & (yy > top), 0.25, 1.0).astype(np.float32)
    return tissue


def _lesion(
    rng: np.random.Generator, pt: PatientPlan, tissue: np.ndarray, prm: SynthParams, sc: float
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Draw the lesion into ``tissue`` (in place); returns its mask and the mask's window.

    Same shape for all of this patient's US images, a new plane and zoom each time: aspect
    from wider-than-tall (s = 0) to taller-than-wide (s = 1), margin from smooth to angular
    with an echogenic halo, posterior enhancement turning into shadowing.
    """
    sh_, sw = tissue.shape
    lrng = np.random.default_rng([pt.lesion_seed, 7])
    s = pt.us_s
    sh = lesion_shape(lrng, s, us=True)
    base_r = lrng.uniform(0.08, 0.14)
    ratio = float(np.clip(0.55 + 0.75 * s + lrng.normal(0, 0.06), 0.4, 1.5))  # height/width
    ratio *= rng.uniform(0.9, 1.1)
    radius = base_r * sw * rng.uniform(0.85, 1.15)
    la, lb = radius / math.sqrt(ratio), radius * math.sqrt(ratio)
    lb = min(lb, 0.28 * sh_)
    la = min(la, 0.3 * sw)
    margin = 0.04 * sw + 3 * max(1, round(sc * 2))
    x_lo = la * 1.3 + margin
    lcx = rng.uniform(x_lo, max(x_lo + 1, sw - la * 1.3 - margin))  # scan coordinates
    lo = max(0.15 * sh_ + lb * 1.3, 0.3 * sh_)
    # A tall lesion in a shallow sector can push the upper bound below the lower one.
    hi = max(0.3 * sh_ + 1, 0.75 * sh_ - lb * 1.3, lo)
    lcy = rng.uniform(lo, hi)
    angle = rng.uniform(-0.25, 0.25) + (sh.angle * 0.1)
    soft = max(0.4, (0.4 + 1.6 * s) * sc)
    sl, dy, dx = patch(lcy, lcx, max(la, lb) * 1.6 + 3 * soft + 2, sh_, sw)
    mask, rho, rb = blob(dy, dx, la, lb, angle, replace(sh, angle=0.0), soft)
    het = 0.15 + 0.45 * s  # malignant lesions have heterogeneous internal echoes
    inner = 0.06 * (1.0 + het * smooth_noise(rng, mask.shape, max(1.5, 3 * sc))).clip(0.0)
    region = tissue[sl]
    c = prm.us_lesion_contrast
    region = region * (1 - mask) + mask * (region * (1 - c) + c * inner)
    if s > 0.55:  # echogenic halo around an infiltrating margin
        halo = np.exp(-(((rho - rb) / 0.18) ** 2)) * (rho > rb)
        region = region + 0.35 * (s - 0.55) / 0.45 * halo
    tissue[sl] = region
    yy = np.arange(sh_, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(sw, dtype=np.float32)[None, :] + 0.5
    post = (0.45 - s) * 1.4  # > 0: enhancement (benign-looking), < 0: shadowing
    lat = np.exp(-(((xx - lcx) / (0.85 * la)) ** 4))
    below = np.clip((yy - (lcy + 0.8 * lb)) / (0.4 * lb + 1), 0.0, 1.0)
    decay = np.exp(-np.clip(yy - (lcy + lb), 0, None) / (2.5 * lb + 1)) if post > 0 else 1.0
    tissue *= np.clip(1.0 + post * lat * below * decay, 0.1, 2.5).astype(np.float32)
    return mask, sl


def _speckle(
    rng: np.random.Generator, tissue: np.ndarray, prm: SynthParams, sc: float
) -> np.ndarray:
    """Multiplicative speckle (Rayleigh-like, elongated laterally) plus electronic noise."""
    shape = tissue.shape
    g1 = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), (0.6 * sc, 1.5 * sc)
    )
    g2 = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), (0.6 * sc, 1.5 * sc)
    )
    speck = np.sqrt(g1 * g1 + g2 * g2)
    speck /= speck.mean() + 1e-6
    scan = tissue * ((1 - prm.us_speckle) + prm.us_speckle * speck)
    return scan + rng.normal(0, prm.us_noise, scan.shape).astype(np.float32)
