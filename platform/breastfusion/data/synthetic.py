"""The synthetic paired cohort: the embedded default data set for ``make demo`` and the tests.

There is no public paired DM + US data set, so the platform ships a generator whose cohort
looks like the study's (Chen et al. 2025; see ``STUDY.md``) in the ways that matter to the
pipeline: patients with several mammograms (DM) and ultrasound images (US), a patient-level
benign/malignant label, US lesion boxes for the ROI detector, mixed file formats and sizes,
and -- most important -- *designed complementarity*, so that each modality alone is imperfect
and fusing both can beat either.

Generative model (all knobs live in :class:`SynthParams`; ``difficulty`` picks a preset)
---------------------------------------------------------------------------------------
Cohort level (drawn from ``seed`` alone, stratified so small cohorts keep the proportions):

* ``malignant_fraction`` (205/790) of patients are malignant -- an exact count, not coin flips,
  so a 40-patient cohort has 10 malignant patients (enough for 5 folds plus a 20 % holdout).
* Malignant patients get an *evidence mode* in exact proportions ``p_evidence_both``,
  ``p_evidence_dm_only`` and the rest US-only. In a modality that shows evidence, the lesion's
  *suspicion* ``s`` (0 = textbook benign, 1 = textbook malignant) is drawn from
  ``suspicion_evident``; in the other modality from ``suspicion_weak`` (equivocal, overlapping
  the benign range). In DM a non-evident lesion is, with ``p_masked``, also hidden by dense
  tissue (the patient's density is then forced to BI-RADS c/d and the mass contrast drops).
* Benign patients carry a DM mimic with ``p_mimic_dm`` and, independently, a US mimic with
  ``p_mimic_us`` (``s`` from ``suspicion_mimic``); otherwise ``s`` is from ``suspicion_benign``.
  Because evidence and mimics are (nearly) independent across modalities, a second modality
  separates "malignant with weak DM signs" from "benign with a DM mimic" -- fusion helps.
* ``dm_only_fraction`` / ``us_only_fraction`` of patients have a single modality.
* Images per patient follow the study's per-class rates (benign ~3.2 DM and ~2.0 US,
  malignant ~2.0 DM and ~1.0 US; overall ~2.8 DM and ~1.7 US per patient).
* File formats are assigned over the whole cohort: ``dm_dicom_fraction`` of DM images are
  DICOM, ``dm_png16_fraction`` 16-bit PNG (each at least one when there are >= 10 DM images),
  the rest 8-bit grey PNG; ``us_rgb_fraction`` of US images are RGB PNG (colour screen marks),
  the rest 8-bit grey PNG.

Patient level (drawn from ``(seed, patient index)``, so a patient never depends on how many
workers render the cohort): lesion side (L/R), breast density (BI-RADS a-d, ``density_probs``),
whether scattered benign calcifications are present (``p_benign_calcs``, label-independent),
and one lesion shape shared by all views of that patient.

DM images (portrait, ``size`` x [1, 1.25] high, [0.75, 0.95] x ``size`` wide): dark
background; breast silhouette (a half ellipse on the chest wall; taller, with an axillary part
and a bright pectoral-muscle triangle on MLO); fibroglandular texture (smooth plus anisotropic
noise thresholded to the density, fading towards the skin); a mass in the lesion-side views:
``s`` turns an oval circumscribed mass into an irregular, indistinct, spiculated one (more
harmonics, soft margin, 0-14 spicules) and raises its density; its contrast falls with breast
density (``dm_masking``), which is how dense breasts hide masses. Malignant DM evidence is a
mass (55 %), clustered pleomorphic microcalcifications (20 %) or both (25 %); DM mimics are
irregular masses or punctate calcification clusters. Contralateral views show no lesion
(labels are per patient, as in the study). L images have the chest wall on the left edge, R
images are mirrored.

US images (landscape, [0.95, 1.25] x ``size`` wide, [0.75, 0.95] x ``size`` high): a scan
rectangle framed by black margins; tissue layers (skin, subcutaneous fat, wavy glandular
layer, retromammary fat, striated pectoral muscle, sometimes a rib with its shadow); depth
attenuation; multiplicative speckle; one hypoechoic lesion whose aspect goes from
wider-than-tall (s = 0) to taller-than-wide (s = 1), margin from smooth to angular and
microlobulated with an echogenic halo, and posterior acoustic enhancement (s < 0.45) turning
into shadowing. Screen clutter outside the lesion box -- text, a depth scale, a focus marker,
calipers, a grey or colour bar, a body-marker pictogram, a logo -- never depends on the label,
so a model can only use it by mistake: cropping matters.

Files under ``out_dir``
-----------------------
* ``manifest.csv`` -- ``patient_id, modality, path, label, view, laterality, box_x0, box_y0,
  box_x1, box_y1``. Every US row has its lesion box (pixels of that image; x0/y0 inclusive,
  x1/y1 exclusive, i.e. slice bounds; the lesion plus ~8 % margin). DM rows leave the box blank
  (the ROI detector is US-only); the DM finding boxes are in ``image_truth.csv``.
* ``cohort_truth.csv`` -- per patient latent truth (evidence mode, mimics, suspicions, density,
  DM finding, masking) for scientific checks (e.g. "does fusion win on the DM-only cases?").
* ``image_truth.csv`` -- per image: format, size, whether the lesion is drawn, its box.
* ``synth_config.json`` -- seed, size, difficulty and the resolved parameters.
* ``images/`` -- ``P0007_DM_L_CC.png``, ``P0007_DM_R_MLO.dcm``, ``P0007_US_L_1.png`` ...

Everything is byte-identical for the same arguments: no timestamps, fixed PNG compression,
DICOM UIDs derived from the seed. The cohort is built in a hidden temporary folder inside
``out_dir`` and moved into place with ``manifest.csv`` last, so an interrupted run never leaves
a manifest that points at missing images.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click
import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.special import ndtri

from breastfusion.data.imaging import box_of, union_boxes
from breastfusion.data.manifest import KNOWN_COLUMNS
from breastfusion.errors import UserError
from breastfusion.io import atomic_write_text, dumps_json, ensure_dir

log = logging.getLogger(__name__)

DIFFICULTIES = ("easy", "standard", "hard")
MANIFEST_COLUMNS = KNOWN_COLUMNS  # the manifest contract, owned by data/manifest.py
TRUTH_COLUMNS = (
    "patient_id",
    "label",
    "evidence",
    "dm_evidence",
    "us_evidence",
    "dm_mimic",
    "us_mimic",
    "dm_finding",
    "dm_masked",
    "dm_suspicion",
    "us_suspicion",
    "density",
    "lesion_side",
    "benign_calcs",
    "n_dm",
    "n_us",
)
IMAGE_TRUTH_COLUMNS = (
    "path",
    "patient_id",
    "modality",
    "view",
    "laterality",
    "format",
    "width",
    "height",
    "lesion_visible",
    "lesion_x0",
    "lesion_y0",
    "lesion_x1",
    "lesion_y1",
)
PNG_COMPRESS_LEVEL = 1  # fixed: same bytes on every run (and a good speed/size trade-off)
MIN_SIZE = 24
_DENSITY_NAMES = ("a", "b", "c", "d")
_DENSITY_FRACTION = (0.15, 0.35, 0.55, 0.75)  # share of the glandular region that is dense
_DENSITY_MASKING = (0.0, 0.25, 0.6, 1.0)  # scales dm_masking: how much mass contrast is lost


@dataclass(frozen=True)
class SynthParams:
    """Parameters of the generative model (see the module docstring for their meaning)."""

    # --- cohort composition (the study's proportions) ---
    malignant_fraction: float = 205 / 790
    dm_count_probs_benign: tuple[float, ...] = (0.04, 0.19, 0.30, 0.47)  # P(1..4 DM images)
    dm_count_probs_malignant: tuple[float, ...] = (0.20, 0.65, 0.10, 0.05)
    us_count_probs_benign: tuple[float, ...] = (0.22, 0.55, 0.23)  # P(1..3 US images)
    us_count_probs_malignant: tuple[float, ...] = (0.98, 0.02, 0.0)
    dm_only_fraction: float = 0.03
    us_only_fraction: float = 0.02
    density_probs: tuple[float, ...] = (0.10, 0.40, 0.40, 0.10)  # BI-RADS a..d
    # --- designed complementarity ---
    p_evidence_both: float = 0.60
    p_evidence_dm_only: float = 0.20  # the rest: evidence in US only
    p_masked: float = 0.4  # non-evident DM lesion of a malignant patient hidden by density
    p_mimic_dm: float = 0.10
    p_mimic_us: float = 0.10
    p_dm_mass_benign: float = 0.75  # benign, no mimic: a circumscribed mass is visible in DM
    p_benign_calcs: float = 0.25  # scattered round calcifications, any label
    malignant_dm_finding_probs: tuple[float, float, float] = (0.55, 0.20, 0.25)  # mass/calc/both
    suspicion_evident: tuple[float, float] = (0.6, 1.0)
    suspicion_weak: tuple[float, float] = (0.25, 0.55)
    suspicion_benign: tuple[float, float] = (0.0, 0.4)
    suspicion_mimic: tuple[float, float] = (0.5, 0.8)
    # --- appearance ---
    dm_mass_contrast: float = 0.2
    dm_masking: float = 0.7
    dm_calc_amplitude: float = 0.45
    dm_noise: float = 0.015
    us_lesion_contrast: float = 0.8  # fraction of the surrounding echo the lesion loses
    us_speckle: float = 0.55
    us_noise: float = 0.03
    # --- file variety ---
    size_jitter: float = 0.25
    us_rgb_fraction: float = 0.6
    dm_png16_fraction: float = 0.08
    dm_dicom_fraction: float = 0.04


PRESETS: dict[str, SynthParams] = {
    "standard": SynthParams(),
    "easy": SynthParams(
        p_evidence_both=0.8,
        p_evidence_dm_only=0.1,
        p_masked=0.2,
        p_mimic_dm=0.04,
        p_mimic_us=0.04,
        suspicion_evident=(0.7, 1.0),
        suspicion_weak=(0.3, 0.6),
        suspicion_benign=(0.0, 0.3),
        dm_mass_contrast=0.27,
        dm_masking=0.5,
        dm_noise=0.01,
        us_speckle=0.45,
        us_noise=0.02,
    ),
    "hard": SynthParams(
        p_evidence_both=0.4,
        p_evidence_dm_only=0.3,
        p_masked=0.5,
        p_mimic_dm=0.18,
        p_mimic_us=0.18,
        suspicion_evident=(0.5, 0.95),
        suspicion_weak=(0.2, 0.55),
        suspicion_benign=(0.0, 0.45),
        suspicion_mimic=(0.45, 0.85),
        dm_mass_contrast=0.14,
        dm_masking=0.85,
        dm_calc_amplitude=0.3,
        dm_noise=0.025,
        us_lesion_contrast=0.65,
        us_speckle=0.65,
        us_noise=0.05,
    ),
}


@dataclass(frozen=True)
class ImagePlan:
    modality: str  # DM | US
    view: str  # CC | MLO for DM, "" for US
    laterality: str  # L | R
    number: int  # 1.. for US (several images of one lesion)
    has_lesion: bool
    fmt: str = "png8"  # png8 | png16 | png_rgb | dicom

    @property
    def filename(self) -> str:
        ext = ".dcm" if self.fmt == "dicom" else ".png"
        tail = self.view if self.modality == "DM" else str(self.number)
        return f"{self.modality}_{self.laterality}_{tail}{ext}"


@dataclass(frozen=True)
class PatientPlan:
    """The latent truth of one patient; rendering turns it into pixels."""

    index: int
    patient_id: str
    malignant: bool
    evidence: str  # both | dm | us (malignant) or none (benign)
    dm_mimic: bool
    us_mimic: bool
    dm_finding: str  # none | mass | calc | mass+calc
    dm_masked: bool
    dm_s: float
    us_s: float
    density: int  # 0..3 = BI-RADS a..d
    side: str
    benign_calcs: bool
    lesion_seed: int
    images: tuple[ImagePlan, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return "malignant" if self.malignant else "benign"


# ----------------------------------------------------------------------------- planning


def _allocate(n: int, probs: Sequence[float]) -> list[int]:
    """Split ``n`` into counts proportional to ``probs`` (largest remainder; sums to n)."""
    p = np.asarray(probs, dtype=float)
    p = p / p.sum()
    raw = p * n
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts.tolist()


def _uniform(rng: np.random.Generator, lohi: tuple[float, float]) -> float:
    return float(rng.uniform(lohi[0], lohi[1]))


def plan_cohort(n_patients: int, seed: int, params: SynthParams) -> list[PatientPlan]:
    """Draw every patient's latent truth and image list (cheap; no pixels)."""
    rng = np.random.default_rng([seed, 0])
    n_mal = min(n_patients, max(0, int(round(n_patients * params.malignant_fraction))))
    malignant = rng.permutation(np.r_[np.ones(n_mal, bool), np.zeros(n_patients - n_mal, bool)])
    mal_idx = np.flatnonzero(malignant)
    ben_idx = np.flatnonzero(~malignant)

    evidence = np.full(n_patients, "none", dtype=object)
    p_us = max(0.0, 1.0 - params.p_evidence_both - params.p_evidence_dm_only)
    counts = _allocate(len(mal_idx), (params.p_evidence_both, params.p_evidence_dm_only, p_us))
    modes = np.repeat(np.array(["both", "dm", "us"], dtype=object), counts)
    evidence[mal_idx] = rng.permutation(modes)

    def pick(pool: np.ndarray, frac: float) -> set[int]:
        k = min(len(pool), int(round(frac * len(pool))))
        return set(rng.choice(pool, size=k, replace=False).tolist()) if k else set()

    dm_mimic = pick(ben_idx, params.p_mimic_dm)
    us_mimic = pick(ben_idx, params.p_mimic_us)
    everyone = np.arange(n_patients)
    dm_only = pick(everyone, params.dm_only_fraction)
    us_only = pick(
        np.setdiff1d(everyone, sorted(dm_only)),
        params.us_only_fraction * (n_patients / max(1, n_patients - len(dm_only))),
    )

    width = max(4, len(str(n_patients)))
    plans: list[PatientPlan] = []
    for i in range(n_patients):
        prng = np.random.default_rng([seed, 1, i])
        is_mal = bool(malignant[i])
        mode = str(evidence[i])
        side = "L" if prng.random() < 0.5 else "R"
        density = int(
            prng.choice(4, p=np.asarray(params.density_probs) / sum(params.density_probs))
        )
        masked = False
        if is_mal:
            dm_s = _uniform(
                prng, params.suspicion_evident if mode in ("both", "dm") else params.suspicion_weak
            )
            us_s = _uniform(
                prng, params.suspicion_evident if mode in ("both", "us") else params.suspicion_weak
            )
            if mode in ("both", "dm"):
                kind = int(prng.choice(3, p=np.asarray(params.malignant_dm_finding_probs)))
                finding = ("mass", "calc", "mass+calc")[kind]
            else:
                finding = "mass"
                masked = bool(prng.random() < params.p_masked)
                if masked:
                    density = max(density, 2 + int(prng.random() < 0.4))
        else:
            if i in dm_mimic:
                dm_s = _uniform(prng, params.suspicion_mimic)
                finding = "mass" if prng.random() < 0.6 else "calc"
            else:
                dm_s = _uniform(prng, params.suspicion_benign)
                finding = "mass" if prng.random() < params.p_dm_mass_benign else "none"
            us_s = _uniform(
                prng, params.suspicion_mimic if i in us_mimic else params.suspicion_benign
            )
        benign_calcs = bool(prng.random() < params.p_benign_calcs)
        lesion_seed = int(prng.integers(0, 2**62))

        dm_probs = params.dm_count_probs_malignant if is_mal else params.dm_count_probs_benign
        us_probs = params.us_count_probs_malignant if is_mal else params.us_count_probs_benign
        n_dm = 1 + int(prng.choice(len(dm_probs), p=np.asarray(dm_probs) / sum(dm_probs)))
        n_us = 1 + int(prng.choice(len(us_probs), p=np.asarray(us_probs) / sum(us_probs)))
        if i in dm_only:
            n_us = 0
        if i in us_only:
            n_dm = 0
        other = "R" if side == "L" else "L"
        views = ["CC", "MLO"] if prng.random() < 0.5 else ["MLO", "CC"]
        dm_slots = [(side, v, True) for v in views] + [(other, v, False) for v in views]
        images = [
            ImagePlan("DM", v, lat, 0, lesion and finding != "none")
            for lat, v, lesion in sorted(dm_slots[:n_dm], key=lambda t: (t[0], t[1]))
        ]
        images += [ImagePlan("US", "", side, k + 1, True) for k in range(n_us)]
        plans.append(
            PatientPlan(
                index=i,
                patient_id=f"P{i + 1:0{width}d}",
                malignant=is_mal,
                evidence=mode,
                dm_mimic=i in dm_mimic,
                us_mimic=i in us_mimic,
                dm_finding=finding,
                dm_masked=masked,
                dm_s=dm_s,
                us_s=us_s,
                density=density,
                side=side,
                benign_calcs=benign_calcs,
                lesion_seed=lesion_seed,
                images=tuple(images),
            )
        )
    return _assign_formats(plans, rng, params)


def _assign_formats(
    plans: list[PatientPlan], rng: np.random.Generator, params: SynthParams
) -> list[PatientPlan]:
    """Spread file formats over the cohort in exact counts (small cohorts still get each)."""
    dm_keys = [(p.index, k) for p in plans for k, im in enumerate(p.images) if im.modality == "DM"]
    us_keys = [(p.index, k) for p in plans for k, im in enumerate(p.images) if im.modality == "US"]

    def count(n: int, frac: float) -> int:
        k = int(round(frac * n))
        return max(k, 1) if n >= 10 and frac > 0 else k

    fmt: dict[tuple[int, int], str] = {}
    order = rng.permutation(len(dm_keys))
    n_dcm = count(len(dm_keys), params.dm_dicom_fraction)
    n_16 = count(len(dm_keys), params.dm_png16_fraction)
    for j, pos in enumerate(order):
        fmt[dm_keys[pos]] = "dicom" if j < n_dcm else "png16" if j < n_dcm + n_16 else "png8"
    order = rng.permutation(len(us_keys))
    n_rgb = count(len(us_keys), params.us_rgb_fraction)
    for j, pos in enumerate(order):
        fmt[us_keys[pos]] = "png_rgb" if j < n_rgb else "png8"
    return [
        replace(
            p,
            images=tuple(replace(im, fmt=fmt[(p.index, k)]) for k, im in enumerate(p.images)),
        )
        for p in plans
    ]


# ----------------------------------------------------------------------------- drawing helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _interp_matrix(n: int, f: int, m: int) -> np.ndarray:
    """(n x m) Gaussian interpolation weights from m coarse knots spaced f pixels apart."""
    pos = (np.arange(n, dtype=np.float32) + 0.5) / f + 1.0
    w = np.exp(-0.5 * ((pos[:, None] - np.arange(m, dtype=np.float32)[None, :]) / 0.75) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
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


def _aniso_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]
) -> np.ndarray:
    out = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    out -= out.mean()
    return out / (out.std() + 1e-6)


def _smooth1d(rng: np.random.Generator, n: int, cell: float) -> np.ndarray:
    k = max(2, int(math.ceil(n / max(cell, 1.0))) + 2)
    knots = rng.standard_normal(k)
    return np.interp(np.linspace(0, k - 1, n), np.arange(k), knots).astype(np.float32)


@dataclass(frozen=True)
class _Shape:
    """A lesion outline in polar form, shared by all views of one patient."""

    ratio: float  # minor/major axis of the base ellipse
    harm_amp: np.ndarray
    harm_phase: np.ndarray
    ang_angles: np.ndarray  # angular (corner) points of the margin
    ang_amp: float
    spic_angles: np.ndarray
    spic_len: np.ndarray  # in units of the radius
    angle: float


def _shape(rng: np.random.Generator, s: float, *, us: bool) -> _Shape:
    k = np.arange(2, 9)
    amp = (0.01 + 0.11 * s) * rng.uniform(0.3, 1.0, k.size) / (k / 2.0)
    amp[-3:] += 0.035 * s * rng.uniform(0.5, 1.0, 3)  # microlobulation
    n_ang = int(round(2 + 5 * s)) if s > 0.35 else 0
    n_spic = 0 if us else int(round(max(0.0, s - 0.5) * 28))
    return _Shape(
        ratio=float(rng.uniform(0.6, 0.95)),
        harm_amp=amp,
        harm_phase=rng.uniform(0, 2 * np.pi, k.size),
        ang_angles=rng.uniform(-np.pi, np.pi, n_ang),
        ang_amp=0.22 * max(0.0, s - 0.35),
        spic_angles=np.sort(rng.uniform(-np.pi, np.pi, n_spic)),
        spic_len=rng.uniform(0.8, 2.2, n_spic) * s,
        angle=float(rng.uniform(-np.pi, np.pi)),
    )


def _outline(theta: np.ndarray, sh: _Shape) -> np.ndarray:
    """Boundary radius (in units of the ellipse radius) as a function of angle."""
    r = np.ones_like(theta)
    for j, (a, ph) in enumerate(zip(sh.harm_amp, sh.harm_phase, strict=True)):
        r += a * np.cos((j + 2) * theta + ph)
    for ang in sh.ang_angles:
        d = np.abs(np.angle(np.exp(1j * (theta - ang))))
        r += sh.ang_amp * np.clip(1.0 - d / 0.45, 0.0, None)
    return r


def _blob(
    dy: np.ndarray,
    dx: np.ndarray,
    a: float,
    b: float,
    angle: float,
    sh: _Shape,
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
    mask = _sigmoid((rb - rho) * min(a, b) / max(soft, 0.3))
    return mask.astype(np.float32), rho, rb


def _patch(cy: float, cx: float, ext: float, h: int, w: int):
    y0, y1 = max(0, int(cy - ext)), min(h, int(cy + ext) + 2)
    x0, x1 = max(0, int(cx - ext)), min(w, int(cx + ext) + 2)
    dy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5) - cy
    dx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5) - cx
    return (slice(y0, y1), slice(x0, x1)), dy, dx


def _bbox(mask: np.ndarray, thr: float) -> tuple[int, int, int, int] | None:
    return box_of(mask > thr)


def _dots(
    img: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    sigmas: np.ndarray,
    amps: np.ndarray,
) -> tuple[int, int, int, int] | None:
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
    return _bbox(np.pad(layer, ((y0, h - y1), (x0, w - x1))), 0.1)


# ----------------------------------------------------------------------------- DM


def _render_dm(
    rng: np.random.Generator, pt: PatientPlan, im: ImagePlan, prm: SynthParams, size: int
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    j = prm.size_jitter
    h = max(MIN_SIZE, round(size * rng.uniform(1.0, 1.0 + j)))
    w = max(MIN_SIZE, round(size * rng.uniform(1.0 - j, 1.0 - j / 5)))
    sc = h / 256.0
    y = np.arange(h, dtype=np.float32)[:, None] + 0.5
    x = np.arange(w, dtype=np.float32)[None, :] + 0.5
    mlo = im.view == "MLO"
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
    a_y = a * (1.0 + 0.04 * _smooth1d(rng, h, max(4.0, h / 6)))[:, None]
    r2 = (x / a_y) ** 2 + ((y - cy) / b) ** 2
    r = np.sqrt(r2)
    edge = np.clip((1.0 - r) * min(a, b) / max(1.5 * sc, 0.6), 0.0, 1.0)
    t = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))

    field_ = 0.85 * _smooth_noise(rng, (h, w), h / 12) + 0.3 * _aniso_noise(
        rng, (h, w), (max(0.5, 1.2 * sc), max(1.0, 5.0 * sc))
    )
    field_ /= field_.std() + 1e-6
    thr = float(ndtri(1.0 - _DENSITY_FRACTION[pt.density]))
    wreg = np.exp(-(((y - cy) / (0.8 * b)) ** 2)) * np.clip((1.0 - r) / 0.15, 0.0, 1.0)
    gland = _sigmoid((field_ - thr) / 0.55) * wreg
    img = edge * (0.14 + 0.2 * np.sqrt(t)) + gland * edge * 0.24 * (0.5 + 0.5 * t)
    img += 0.05 * edge * np.exp(-(((1.0 - r) * min(a, b) / max(1.2 * sc, 0.5)) ** 2))  # skin

    px = py = 0.0
    if mlo:
        px, py = w * rng.uniform(0.28, 0.42), h * rng.uniform(0.5, 0.75)
        pm = np.clip((1.0 - x / px - y / py) * min(px, py) / max(1.5 * sc, 0.6), 0.0, 1.0)
        img = img * (1.0 - pm) + pm * (0.56 + 0.03 * field_)

    box = None
    if im.has_lesion:
        box = _dm_lesion(img, pt, mlo, prm, sc, (cy, b, a, px, py, field_))
    if pt.benign_calcs:
        n = int(rng.integers(2, 6))
        ty = cy + b * rng.uniform(-0.7, 0.7, n)
        tx = a * rng.uniform(0.15, 0.8, n) * np.sqrt(np.clip(1 - ((ty - cy) / b) ** 2, 0, 1))
        _dots(
            img,
            ty.astype(np.float32),
            tx.astype(np.float32),
            np.full(n, max(0.7, 1.8 * sc), np.float32),
            rng.uniform(0.2, 0.35, n).astype(np.float32),
        )
    img += rng.normal(0.0, prm.dm_noise, img.shape).astype(np.float32) * (0.4 + 0.6 * edge)
    img = np.clip(img + 0.03, 0.0, 1.0)
    if im.laterality == "R":
        img = img[:, ::-1]
        if box is not None:
            box = (w - box[2], box[1], w - box[0], box[3])
    return np.ascontiguousarray(img), box


def _dm_lesion(
    img: np.ndarray,
    pt: PatientPlan,
    mlo: bool,
    prm: SynthParams,
    sc: float,
    geom: tuple[float, float, float, float, float, np.ndarray],
) -> tuple[int, int, int, int] | None:
    """Draw the patient's DM finding (same lesion, view-specific position); returns its box."""
    cy, b, a, px, py, _ = geom
    h, w = img.shape
    lrng = np.random.default_rng(pt.lesion_seed)  # same draws for every view of the patient
    s = pt.dm_s
    sh = _shape(lrng, s, us=False)
    depth, vert = lrng.uniform(0.3, 0.65), lrng.uniform(-0.45, 0.45)
    radius_frac = lrng.uniform(0.04, 0.07)
    calc_pos = lrng.uniform(-0.5, 0.5, 2)
    vrng = np.random.default_rng([pt.lesion_seed, 1 + int(mlo)])  # per-view jitter
    ly = cy + b * (vert * 0.8 - (0.1 if mlo else 0.0))
    half = math.sqrt(max(0.05, 1 - ((ly - cy) / b) ** 2))
    lx = depth * a * half
    if mlo and ly < py:
        lx = max(lx, px * (1 - ly / py) + 0.08 * a)
    lx = min(lx, 0.8 * a * half)
    radius = max(1.5, radius_frac * h)
    angle = sh.angle + vrng.uniform(-0.4, 0.4)
    boxes = []
    if "mass" in pt.dm_finding:
        soft = max(0.4, (0.5 + 2.0 * s) * sc)
        ext = (
            radius * (1.25 + (float(sh.spic_len.max()) if sh.spic_len.size else 0.0)) + 3 * soft + 2
        )
        sl, dy, dx = _patch(ly, lx, ext, h, w)
        ra, rb_ = radius / math.sqrt(sh.ratio), radius * math.sqrt(sh.ratio)
        if s < 0.45:  # benign masses are round/oval
            ra, rb_ = (
                radius / math.sqrt(0.5 + 0.5 * sh.ratio),
                radius * math.sqrt(0.5 + 0.5 * sh.ratio),
            )
        mask, _, _ = _blob(dy, dx, ra, rb_, angle, sh, soft)
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
        contrast = prm.dm_mass_contrast * (0.75 + 0.5 * s)
        contrast *= 1.0 - prm.dm_masking * _DENSITY_MASKING[pt.density]
        if pt.dm_masked:
            contrast *= 0.2
        img[sl] += contrast * mask
        if contrast > 0.02:
            bb = _bbox(mask, 0.3)
            if bb is not None:
                boxes.append(
                    (
                        bb[0] + sl[1].start,
                        bb[1] + sl[0].start,
                        bb[2] + sl[1].start,
                        bb[3] + sl[0].start,
                    )
                )
    if "calc" in pt.dm_finding:
        n = 5 + int(round(13 * s))
        spread = max(1.5, h * lrng.uniform(0.015, 0.03) * (1.3 - 0.5 * s))
        cyc = ly + (0 if "mass" in pt.dm_finding else calc_pos[0] * radius)
        cxc = lx + (0 if "mass" in pt.dm_finding else calc_pos[1] * radius)
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
        amps = prm.dm_calc_amplitude * lrng.uniform(0.6, 1.0, n)
        bb = _dots(
            img,
            ys.astype(np.float32),
            xs.astype(np.float32),
            sig.astype(np.float32),
            amps.astype(np.float32),
        )
        if bb is not None:
            boxes.append(bb)
    return union_boxes(boxes)


# ----------------------------------------------------------------------------- US

# 3x5 bitmap font: deterministic screen text at any scale, no font files needed.
_FONT_ROWS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010",
    "P": "110101110100100", "R": "110101110101101", "S": "011100010001110",
    "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "X": "101101010101101", "Z": "111001010100111", ":": "000010000010000",
    ".": "000000000000010", "-": "000000111000000", "/": "001001010100100",
    "%": "101001010100101", " ": "000000000000000",
}  # fmt: skip
_FONT = {
    ch: np.array([int(c) for c in bits], dtype=bool).reshape(5, 3)
    for ch, bits in _FONT_ROWS.items()
}


def _text_mask(text: str, scale: int) -> np.ndarray:
    glyphs = []
    for ch in text.upper():
        glyphs.append(_FONT.get(ch, _FONT[" "]))
        glyphs.append(np.zeros((5, 1), bool))
    m = np.concatenate(glyphs[:-1], axis=1) if glyphs else np.zeros((5, 1), bool)
    return np.kron(m, np.ones((scale, scale), bool))


class _Overlay:
    """Screen marks collected as (mask, colour); applied at the end outside the lesion box."""

    def __init__(self, h: int, w: int):
        self.alpha = np.zeros((h, w), bool)
        self.colour = np.zeros((h, w, 3), np.float32)

    def stamp(self, mask: np.ndarray, y: int, x: int, colour: Sequence[float]) -> None:
        h, w = self.alpha.shape
        y0, x0 = max(0, y), max(0, x)
        y1, x1 = min(h, y + mask.shape[0]), min(w, x + mask.shape[1])
        if y0 >= y1 or x0 >= x1:
            return
        m = mask[y0 - y : y1 - y, x0 - x : x1 - x]
        self.alpha[y0:y1, x0:x1] |= m
        self.colour[y0:y1, x0:x1][m] = colour

    def rect(self, y0: int, x0: int, y1: int, x1: int, colour: Sequence[float]) -> None:
        self.stamp(np.ones((max(0, y1 - y0), max(0, x1 - x0)), bool), y0, x0, colour)

    def text(self, s: str, y: int, x: int, scale: int, colour: Sequence[float]) -> None:
        self.stamp(_text_mask(s, scale), y, x, colour)


def _render_us(
    rng: np.random.Generator, pt: PatientPlan, im: ImagePlan, prm: SynthParams, size: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    j = prm.size_jitter
    w = max(MIN_SIZE, round(size * rng.uniform(1.0 - j / 5, 1.0 + j)))
    h = max(MIN_SIZE, round(size * rng.uniform(1.0 - j, 1.0 - j / 5)))
    sc = max(size / 256.0, 0.3)
    sx0, sx1 = round(w * rng.uniform(0.10, 0.15)), w - round(w * rng.uniform(0.08, 0.13))
    sy0, sy1 = round(h * rng.uniform(0.08, 0.12)), h - round(h * rng.uniform(0.03, 0.06))
    sh_, sw = sy1 - sy0, sx1 - sx0
    z = (np.arange(sh_, dtype=np.float32)[:, None] + 0.5) / sh_
    zb2 = rng.uniform(0.13, 0.22) + 0.03 * _smooth1d(rng, sw, sw / 4)[None, :]
    zb3 = rng.uniform(0.55, 0.68) + 0.05 * _smooth1d(rng, sw, sw / 3)[None, :]
    zb4 = zb3 + rng.uniform(0.07, 0.12)
    edge = 0.012

    def step(zb: np.ndarray | float) -> np.ndarray:
        return _sigmoid((z - zb) / edge)

    tex = _smooth_noise(rng, (sh_, sw), max(2.0, sw / 12))
    fat = 0.26 + 0.05 * tex
    gland = 0.62 * (1.0 + 0.25 * tex)
    stripes = np.sin(2 * np.pi * (z * rng.uniform(14, 22) + 0.15 * tex))
    muscle = 0.42 + 0.1 * stripes
    tissue = 0.85 * (1 - step(0.035)) + step(0.035) * fat
    tissue = tissue * (1 - step(zb2)) + step(zb2) * gland
    tissue = tissue * (1 - step(zb3)) + step(zb3) * fat
    tissue = tissue * (1 - step(zb4)) + step(zb4) * muscle
    tissue = tissue.astype(np.float32)
    yy = np.arange(sh_, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(sw, dtype=np.float32)[None, :] + 0.5
    if rng.random() < 0.3:  # a rib: bright curved surface and its acoustic shadow
        rc, rw = rng.uniform(0.2, 0.8) * sw, rng.uniform(0.12, 0.2) * sw
        top = sh_ * (0.88 + 0.05 * ((xx - rc) / rw) ** 2)
        inside = np.abs(xx - rc) < rw
        tissue += 0.5 * np.exp(-(((yy - top) / max(1.0, 1.5 * sc)) ** 2)) * inside
        tissue *= np.where(inside & (yy > top), 0.25, 1.0).astype(np.float32)

    # The lesion: same shape for all of this patient's US images, new plane and zoom each time.
    lrng = np.random.default_rng([pt.lesion_seed, 7])
    s = pt.us_s
    sh = _shape(lrng, s, us=True)
    base_r = lrng.uniform(0.08, 0.14)
    ratio = float(np.clip(0.55 + 0.75 * s + lrng.normal(0, 0.06), 0.4, 1.5))  # height/width
    ratio *= rng.uniform(0.9, 1.1)
    radius = base_r * sw * rng.uniform(0.85, 1.15)
    la, lb = radius / math.sqrt(ratio), radius * math.sqrt(ratio)
    lb = min(lb, 0.28 * sh_)
    la = min(la, 0.3 * sw)
    margin = 0.04 * sw + 3 * max(1, round(sc * 2))
    lcx = rng.uniform(
        sx0 + la * 1.3 + margin, max(sx0 + la * 1.3 + margin + 1, sx1 - la * 1.3 - margin)
    )
    lo = max(0.15 * sh_ + lb * 1.3, 0.3 * sh_)
    # A tall lesion in a shallow sector can push the upper bound below the lower one; numpy
    # then raises. Clamping changes only draws that used to crash (cohorts stay identical).
    hi = max(0.3 * sh_ + 1, 0.75 * sh_ - lb * 1.3, lo)
    lcy = sy0 + rng.uniform(lo, hi)
    angle = rng.uniform(-0.25, 0.25) + (sh.angle * 0.1)
    soft = max(0.4, (0.4 + 1.6 * s) * sc)
    sl, dy, dx = _patch(lcy - sy0, lcx - sx0, max(la, lb) * 1.6 + 3 * soft + 2, sh_, sw)
    sh_u = replace(sh, angle=0.0)
    mask, rho, rb = _blob(dy, dx, la, lb, angle, sh_u, soft)
    het = 0.15 + 0.45 * s  # malignant lesions have heterogeneous internal echoes
    inner = 0.06 * (1.0 + het * _smooth_noise(rng, mask.shape, max(1.5, 3 * sc))).clip(0.0)
    region = tissue[sl]
    c = prm.us_lesion_contrast
    region = region * (1 - mask) + mask * (region * (1 - c) + c * inner)
    if s > 0.55:  # echogenic halo around an infiltrating margin
        halo = np.exp(-(((rho - rb) / 0.18) ** 2)) * (rho > rb)
        region = region + 0.35 * (s - 0.55) / 0.45 * halo
    tissue[sl] = region
    # Posterior acoustic features: enhancement for benign-looking, shadowing for malignant.
    post = (0.45 - s) * 1.4
    lat = np.exp(-(((xx - (lcx - sx0)) / (0.85 * la)) ** 4))
    below = np.clip((yy - (lcy - sy0 + 0.8 * lb)) / (0.4 * lb + 1), 0.0, 1.0)
    decay = np.exp(-np.clip(yy - (lcy - sy0 + lb), 0, None) / (2.5 * lb + 1)) if post > 0 else 1.0
    tissue *= np.clip(1.0 + post * lat * below * decay, 0.1, 2.5).astype(np.float32)

    tissue *= (1.05 - 0.35 * z).astype(np.float32)  # attenuation after time-gain compensation
    g1 = ndimage.gaussian_filter(
        rng.standard_normal((sh_, sw)).astype(np.float32), (0.6 * sc, 1.5 * sc)
    )
    g2 = ndimage.gaussian_filter(
        rng.standard_normal((sh_, sw)).astype(np.float32), (0.6 * sc, 1.5 * sc)
    )
    speck = np.sqrt(g1 * g1 + g2 * g2)
    speck /= speck.mean() + 1e-6
    scan = tissue * ((1 - prm.us_speckle) + prm.us_speckle * speck)
    scan += rng.normal(0, prm.us_noise, scan.shape).astype(np.float32)
    grey = np.zeros((h, w), np.float32)
    grey[sy0:sy1, sx0:sx1] = np.clip(scan, 0.0, 1.0)

    bb = _bbox(mask, 0.5) or (0, 0, mask.shape[1], mask.shape[0])
    bx0, by0 = bb[0] + sl[1].start + sx0, bb[1] + sl[0].start + sy0
    bx1, by1 = bb[2] + sl[1].start + sx0, bb[3] + sl[0].start + sy0
    pad = max(1, round(0.08 * max(bx1 - bx0, by1 - by0)))
    box = (max(sx0, bx0 - pad), max(sy0, by0 - pad), min(sx1, bx1 + pad), min(sy1, by1 + pad))

    rgb = im.fmt == "png_rgb"
    ov = _Overlay(h, w)
    _clutter(rng, ov, im, (sx0, sy0, sx1, sy1), box, rgb, sc)
    ov.alpha[box[1] : box[3], box[0] : box[2]] = False  # the lesion itself is never covered
    if rgb:
        out = np.repeat(grey[:, :, None], 3, axis=2)
        out[ov.alpha] = ov.colour[ov.alpha]
    else:
        out = grey
        out[ov.alpha] = ov.colour[ov.alpha].mean(axis=1)
    return out, box


def _clutter(
    rng: np.random.Generator,
    ov: _Overlay,
    im: ImagePlan,
    scan: tuple[int, int, int, int],
    box: tuple[int, int, int, int],
    rgb: bool,
    sc: float,
) -> None:
    """Label-independent screen marks: text, depth scale, focus, calipers, bars, pictograms."""
    h, w = ov.alpha.shape
    sx0, sy0, sx1, sy1 = scan
    fs = max(1, round(h / 110))

    def col(rgb_colour: tuple[float, float, float], grey_level: float) -> tuple[float, ...]:
        return rgb_colour if rgb else (grey_level,) * 3

    white = col((0.92, 0.92, 0.92), 0.92)
    side = "LEFT" if im.laterality == "L" else "RIGHT"
    lines = [
        f"{'BREAST ' + im.laterality if rng.random() < 0.5 else side}",
        f"{int(rng.integers(1, 13))}:00 {int(rng.integers(1, 9))}CM FN",
    ]
    for k, s in enumerate(lines):
        ov.text(s, 1 + k * 6 * fs, 2, fs, white)
    right = [
        f"L{int(rng.integers(9, 19))}-{int(rng.integers(3, 6))} {int(rng.integers(8, 15))}MHZ",
        f"G{int(rng.integers(30, 70))} DR{int(rng.integers(50, 80))}",
    ]
    for k, s in enumerate(right):
        m = _text_mask(s, fs)
        ov.stamp(m, 1 + k * 6 * fs, w - m.shape[1] - 2, white)
    depth_cm = int(rng.integers(3, 6))
    ov.text(f"D {depth_cm}.{int(rng.integers(0, 10))}CM", h - 6 * fs, 2, fs, white)
    # depth scale with ticks in the right margin
    xs = min(w - 2, sx1 + 1 + fs)
    ov.rect(sy0, xs, sy1, xs + 1, white)
    for k in range(depth_cm + 1):
        ty = sy0 + round(k * (sy1 - sy0 - 1) / depth_cm)
        ov.rect(ty, xs, ty + 1, xs + 2 * fs + 1, white)
    # focus marker (a small triangle) at a random depth
    fy = round(rng.uniform(sy0 + 2, sy1 - 3))
    tri = np.tri(2 * fs + 1, fs + 1, dtype=bool) & np.tri(2 * fs + 1, fs + 1, dtype=bool)[::-1]
    ov.stamp(tri[:, ::-1], fy - fs, xs - fs - 2, col((1.0, 0.85, 0.1), 0.8))
    # calipers just outside the lesion box, as a sonographer would measure it
    arm = max(1, round(2 * sc))
    cross = np.zeros((2 * arm + 1, 2 * arm + 1), bool)
    cross[arm, :] = cross[:, arm] = True
    cal = col((0.2, 1.0, 0.2) if rng.random() < 0.5 else (1.0, 1.0, 0.2), 0.95)
    cyc = (box[1] + box[3]) // 2
    ov.stamp(cross, cyc - arm, box[0] - 2 * arm - 2, cal)
    ov.stamp(cross, cyc - arm, box[2] + 1, cal)
    if rng.random() < 0.5:
        cxc = (box[0] + box[2]) // 2
        ov.stamp(cross, box[1] - 2 * arm - 2, cxc - arm, cal)
        ov.stamp(cross, box[3] + 1, cxc - arm, cal)
    # grey or colour bar in the left margin
    bar_w = max(1, sx0 // 4)
    bx = max(0, sx0 - 2 * bar_w - 1)
    n = max(1, sy1 - sy0)
    ramp = np.linspace(1.0, 0.0, n, dtype=np.float32)
    bar = np.ones((n, bar_w), bool)
    if rgb and rng.random() < 0.6:
        colours = np.stack([ramp, 0.5 + 0.5 * np.sin(np.pi * ramp), 1.0 - ramp], axis=1)
    else:
        colours = np.repeat(ramp[:, None], 3, axis=1)
    for k in range(bar_w):
        ov.alpha[sy0 : sy0 + n, bx + k] |= bar[:, k]
        ov.colour[sy0 : sy0 + n, bx + k] = colours
    # body-marker pictogram (breast circle with probe line) bottom-left, and a logo top-right
    r = max(2, round(6 * sc))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    ring = np.abs(np.hypot(yy, xx) - r + 0.5) < 0.8
    ang = rng.uniform(0, np.pi)
    ring |= (np.abs(yy * math.cos(ang) - xx * math.sin(ang)) < 0.7) & (np.hypot(yy, xx) < r)
    ov.stamp(ring, h - 2 * r - 2 - 6 * fs, 2, col((0.3, 0.85, 1.0), 0.75))
    if rng.random() < 0.7:
        lw = max(2, round(10 * sc))
        ov.rect(h - lw // 2 - 2, w - lw - 2, h - 2, w - 2, col((1.0, 0.55, 0.1), 0.6))


# ----------------------------------------------------------------------------- encoding


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _dicom(
    img: np.ndarray, pt: PatientPlan, im: ImagePlan, seed: int, rng: np.random.Generator
) -> bytes:
    """A minimal, valid DM DICOM: MONOCHROME2, uint16, rescale slope/intercept, no real PHI."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    slope, intercept = [(1.0, 0.0), (2.0, -1024.0), (0.25, 0.0)][int(rng.integers(0, 3))]
    raw = img * 4095.0  # the "physical" 12-bit detector value the reader should recover
    stored = np.clip(np.round((raw - intercept) / slope), 0, 65535).astype("<u2")
    key = ["breastfusion-synthetic", str(seed), pt.patient_id]
    sop_class = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image, For Presentation
    sop_uid = generate_uid(entropy_srcs=[*key, im.laterality, im.view])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*key, "series", im.laterality, im.view])
    ds.Modality = "MG"
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = pt.patient_id
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = im.laterality
    ds.ViewPosition = im.view
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- rendering


def render_patient(
    pt: PatientPlan, seed: int, size: int, params: SynthParams, image_dir: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Render and write one patient's images; returns (manifest rows, image-truth rows).

    The random stream depends only on ``(seed, patient index)``, so the output is the same
    whatever the number of worker processes.
    """
    rng = np.random.default_rng([seed, 2, pt.index])
    rows: list[dict[str, str]] = []
    truth: list[dict[str, str]] = []
    for im in pt.images:
        name = f"{pt.patient_id}_{im.filename}"
        if im.modality == "DM":
            img, box = _render_dm(rng, pt, im, params, size)
            if im.fmt == "dicom":
                data = _dicom(img, pt, im, seed, rng)
            elif im.fmt == "png16":
                data = _png(np.round(img * 16383.0).astype(np.uint16))  # 14-bit detector range
            else:
                data = _png(np.round(img * 255.0).astype(np.uint8))
            manifest_box: tuple[int, int, int, int] | None = None
        else:
            img, box = _render_us(rng, pt, im, params, size)
            data = _png(np.round(img * 255.0).astype(np.uint8))
            manifest_box = box
        with open(os.path.join(image_dir, name), "wb") as fh:
            fh.write(data)
        rel = f"images/{name}"
        hgt, wid = img.shape[:2]
        rows.append(
            {
                "patient_id": pt.patient_id,
                "modality": im.modality,
                "path": rel,
                "label": pt.label,
                "view": im.view,
                "laterality": im.laterality,
                **_box_cols("box_", manifest_box),
            }
        )
        truth.append(
            {
                "path": rel,
                "patient_id": pt.patient_id,
                "modality": im.modality,
                "view": im.view,
                "laterality": im.laterality,
                "format": im.fmt,
                "width": str(wid),
                "height": str(hgt),
                "lesion_visible": str(int(box is not None)),
                **_box_cols("lesion_", box),
            }
        )
    return rows, truth


def _box_cols(prefix: str, box: tuple[int, int, int, int] | None) -> dict[str, str]:
    keys = [f"{prefix}{k}" for k in ("x0", "y0", "x1", "y1")]
    return dict(zip(keys, [str(v) for v in box] if box else ["", "", "", ""], strict=True))


def _render_batch(
    args: tuple[list[PatientPlan], int, int, SynthParams, str],
) -> list[tuple[list[dict[str, str]], list[dict[str, str]]]]:
    plans, seed, size, params, image_dir = args
    return [render_patient(p, seed, size, params, image_dir) for p in plans]


def _truth_row(p: PatientPlan) -> dict[str, str]:
    n_dm = sum(im.modality == "DM" for im in p.images)
    return {
        "patient_id": p.patient_id,
        "label": p.label,
        "evidence": p.evidence,
        "dm_evidence": str(int(p.evidence in ("both", "dm"))),
        "us_evidence": str(int(p.evidence in ("both", "us"))),
        "dm_mimic": str(int(p.dm_mimic)),
        "us_mimic": str(int(p.us_mimic)),
        "dm_finding": p.dm_finding,
        "dm_masked": str(int(p.dm_masked)),
        "dm_suspicion": f"{p.dm_s:.3f}",
        "us_suspicion": f"{p.us_s:.3f}",
        "density": _DENSITY_NAMES[p.density],
        "lesion_side": p.side,
        "benign_calcs": str(int(p.benign_calcs)),
        "n_dm": str(n_dm),
        "n_us": str(len(p.images) - n_dm),
    }


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def resolve_params(difficulty: str) -> SynthParams:
    try:
        return PRESETS[difficulty]
    except KeyError:
        raise UserError(
            f"unknown difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}"
        ) from None


def generate_cohort(
    out_dir: str | os.PathLike,
    n_patients: int = 790,
    seed: int = 0,
    size: int = 256,
    difficulty: str = "standard",
    *,
    workers: int | None = None,
    params: SynthParams | None = None,
) -> Path:
    """Write a synthetic paired DM + US cohort under ``out_dir``; return its ``manifest.csv``.

    ``workers`` processes render patients in parallel (default: 1 for small cohorts, else up
    to 2); the files are identical whatever the number. ``params`` overrides the preset.
    An existing cohort in ``out_dir`` is replaced; a non-cohort ``images/`` folder is refused.
    """
    if n_patients < 1:
        raise UserError(f"--patients must be at least 1 (got {n_patients})")
    if size < MIN_SIZE:
        raise UserError(f"--size must be at least {MIN_SIZE} px (got {size})")
    prm = params if params is not None else resolve_params(difficulty)
    out = ensure_dir(out_dir)
    manifest = out / "manifest.csv"
    images = out / "images"
    if images.exists() and any(images.iterdir()) and not (out / "cohort_truth.csv").exists():
        raise UserError(
            f"{images} exists and is not a synthetic cohort made by 'breastfusion synth'; "
            "choose an empty --out folder"
        )
    # No manifest may outlive the images it lists, even if we are interrupted from here on.
    manifest.unlink(missing_ok=True)

    plans = plan_cohort(n_patients, seed, prm)
    if workers is None:
        workers = 1 if n_patients < 150 else max(1, min(2, os.cpu_count() or 1))
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=out))
    try:
        (tmp / "images").mkdir()
        image_dir = str(tmp / "images")
        if workers <= 1:
            results = [render_patient(p, seed, size, prm, image_dir) for p in plans]
        else:
            chunk = max(1, math.ceil(len(plans) / (workers * 8)))
            batches = [
                (plans[k : k + chunk], seed, size, prm, image_dir)
                for k in range(0, len(plans), chunk)
            ]
            # spawn, not fork: the caller may hold torch/BLAS threads that fork would break.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                results = [r for batch in pool.map(_render_batch, batches) for r in batch]
        rows = [row for r, _ in results for row in r]
        img_truth = [row for _, t in results for row in t]
        (tmp / "cohort_truth.csv").write_text(
            _csv_text(TRUTH_COLUMNS, [_truth_row(p) for p in plans]), encoding="utf-8"
        )
        (tmp / "image_truth.csv").write_text(
            _csv_text(IMAGE_TRUTH_COLUMNS, img_truth), encoding="utf-8"
        )
        config = {
            "generator": "breastfusion.data.synthetic",
            "n_patients": n_patients,
            "seed": seed,
            "size": size,
            "difficulty": difficulty if params is None else "custom",
            "params": asdict(prm),
        }
        (tmp / "synth_config.json").write_text(dumps_json(config), encoding="utf-8")
        if images.exists():
            shutil.rmtree(images)
        os.replace(tmp / "images", images)
        for name in ("cohort_truth.csv", "image_truth.csv", "synth_config.json"):
            os.replace(tmp / name, out / name)
        atomic_write_text(manifest, _csv_text(MANIFEST_COLUMNS, rows))  # last: the commit point
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def summarize(manifest: str | os.PathLike) -> dict[str, int]:
    """Counts for the CLI summary, read back from the written manifest."""
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    labels: dict[str, str] = {}
    mods: dict[str, set[str]] = {}
    for r in rows:
        labels[r["patient_id"]] = r["label"]
        mods.setdefault(r["patient_id"], set()).add(r["modality"])
    return {
        "patients": len(labels),
        "benign": sum(v == "benign" for v in labels.values()),
        "malignant": sum(v == "malignant" for v in labels.values()),
        "dm_images": sum(r["modality"] == "DM" for r in rows),
        "us_images": sum(r["modality"] == "US" for r in rows),
        "both": sum(m == {"DM", "US"} for m in mods.values()),
        "dm_only": sum(m == {"DM"} for m in mods.values()),
        "us_only": sum(m == {"US"} for m in mods.values()),
    }


@click.command("synth")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option("--patients", default=790, show_default=True, type=int, help="Number of patients.")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same bytes)."
)
@click.option(
    "--size",
    default=256,
    show_default=True,
    type=int,
    help="Nominal image size in pixels (sizes vary ±25%).",
)
@click.option(
    "--difficulty",
    default="standard",
    show_default=True,
    type=click.Choice(DIFFICULTIES),
    help="Contrast, noise and mimic rates.",
)
@click.option(
    "--workers",
    default=None,
    type=int,
    help="Worker processes (default: 1 for small cohorts, else 2).",
)
def synth_command(
    out_dir: str, patients: int, seed: int, size: int, difficulty: str, workers: int | None
) -> None:
    """Write a synthetic paired DM + US cohort (images + manifest.csv) into OUT."""
    t0 = time.perf_counter()
    manifest = generate_cohort(out_dir, patients, seed, size, difficulty, workers=workers)
    dt = time.perf_counter() - t0
    c = summarize(manifest)
    click.echo(
        f"Wrote a synthetic cohort of {c['patients']} patients ({c['benign']} benign, "
        f"{c['malignant']} malignant; {c['both']} with both modalities, {c['dm_only']} DM only, "
        f"{c['us_only']} US only) with {c['dm_images']} DM and {c['us_images']} US images "
        f"(~{size} px, difficulty {difficulty}, seed {seed}) in {dt:.1f} s. "
        f"Manifest: {manifest}; latent truth: {Path(manifest).parent / 'cohort_truth.csv'}."
    )
