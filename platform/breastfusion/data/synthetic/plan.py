"""Cohort and patient plans: every patient's latent truth and image list, before any pixel.

Cohort-level draws (labels, evidence modes, mimics, single-modality patients, file formats)
come from ``seed`` alone and use exact counts, so small cohorts keep the proportions; each
patient's own draws come from ``(seed, patient index)``, so a patient never depends on the
cohort size's other patients or on how many workers render it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from breastfusion.data.synthetic.params import SynthParams


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


@dataclass(frozen=True)
class _CohortDraws:
    """The cohort-level assignments every patient plan reads."""

    malignant: np.ndarray  # bool per patient
    evidence: np.ndarray  # object per patient: both | dm | us | none
    dm_mimic: set[int]
    us_mimic: set[int]
    dm_only: set[int]
    us_only: set[int]


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


def _pick(rng: np.random.Generator, pool: np.ndarray, frac: float) -> set[int]:
    k = min(len(pool), int(round(frac * len(pool))))
    return set(rng.choice(pool, size=k, replace=False).tolist()) if k else set()


def _cohort_draws(n_patients: int, rng: np.random.Generator, params: SynthParams) -> _CohortDraws:
    n_mal = min(n_patients, max(0, int(round(n_patients * params.malignant_fraction))))
    malignant = rng.permutation(np.r_[np.ones(n_mal, bool), np.zeros(n_patients - n_mal, bool)])
    mal_idx = np.flatnonzero(malignant)
    ben_idx = np.flatnonzero(~malignant)

    evidence = np.full(n_patients, "none", dtype=object)
    p_us = max(0.0, 1.0 - params.p_evidence_both - params.p_evidence_dm_only)
    counts = _allocate(len(mal_idx), (params.p_evidence_both, params.p_evidence_dm_only, p_us))
    modes = np.repeat(np.array(["both", "dm", "us"], dtype=object), counts)
    evidence[mal_idx] = rng.permutation(modes)

    dm_mimic = _pick(rng, ben_idx, params.p_mimic_dm)
    us_mimic = _pick(rng, ben_idx, params.p_mimic_us)
    everyone = np.arange(n_patients)
    dm_only = _pick(rng, everyone, params.dm_only_fraction)
    us_only = _pick(
        rng,
        np.setdiff1d(everyone, sorted(dm_only)),
        params.us_only_fraction * (n_patients / max(1, n_patients - len(dm_only))),
    )
    return _CohortDraws(malignant, evidence, dm_mimic, us_mimic, dm_only, us_only)


def plan_cohort(n_patients: int, seed: int, params: SynthParams) -> list[PatientPlan]:
    """Draw every patient's latent truth and image list (cheap; no pixels)."""
    rng = np.random.default_rng([seed, 0])
    draws = _cohort_draws(n_patients, rng, params)
    width = max(4, len(str(n_patients)))
    plans = [
        _plan_patient(i, f"P{i + 1:0{width}d}", seed, draws, params) for i in range(n_patients)
    ]
    return _assign_formats(plans, rng, params)


def _findings(
    prng: np.random.Generator, i: int, draws: _CohortDraws, params: SynthParams, density: int
) -> tuple[float, float, str, bool, int]:
    """(DM suspicion, US suspicion, DM finding, masked, density) of patient ``i``."""
    mode = str(draws.evidence[i])
    masked = False
    if draws.malignant[i]:
        dm_evident, us_evident = mode in ("both", "dm"), mode in ("both", "us")
        dm_s = _uniform(prng, params.suspicion_evident if dm_evident else params.suspicion_weak)
        us_s = _uniform(prng, params.suspicion_evident if us_evident else params.suspicion_weak)
        if dm_evident:
            kind = int(prng.choice(3, p=np.asarray(params.malignant_dm_finding_probs)))
            finding = ("mass", "calc", "mass+calc")[kind]
        else:
            finding = "mass"
            masked = bool(prng.random() < params.p_masked)
            if masked:
                density = max(density, 2 + int(prng.random() < 0.4))
        return dm_s, us_s, finding, masked, density
    if i in draws.dm_mimic:
        dm_s = _uniform(prng, params.suspicion_mimic)
        finding = "mass" if prng.random() < 0.6 else "calc"
    else:
        dm_s = _uniform(prng, params.suspicion_benign)
        finding = "mass" if prng.random() < params.p_dm_mass_benign else "none"
    us_s = _uniform(
        prng, params.suspicion_mimic if i in draws.us_mimic else params.suspicion_benign
    )
    return dm_s, us_s, finding, masked, density


def _plan_patient(
    i: int, patient_id: str, seed: int, draws: _CohortDraws, params: SynthParams
) -> PatientPlan:
    prng = np.random.default_rng([seed, 1, i])
    is_mal = bool(draws.malignant[i])
    side = "L" if prng.random() < 0.5 else "R"
    density = int(prng.choice(4, p=np.asarray(params.density_probs) / sum(params.density_probs)))
    dm_s, us_s, finding, masked, density = _findings(prng, i, draws, params, density)
    benign_calcs = bool(prng.random() < params.p_benign_calcs)
    lesion_seed = int(prng.integers(0, 2**62))

    dm_probs = params.dm_count_probs_malignant if is_mal else params.dm_count_probs_benign
    us_probs = params.us_count_probs_malignant if is_mal else params.us_count_probs_benign
    n_dm = 1 + int(prng.choice(len(dm_probs), p=np.asarray(dm_probs) / sum(dm_probs)))
    n_us = 1 + int(prng.choice(len(us_probs), p=np.asarray(us_probs) / sum(us_probs)))
    if i in draws.dm_only:
        n_us = 0
    if i in draws.us_only:
        n_dm = 0
    other = "R" if side == "L" else "L"
    views = ["CC", "MLO"] if prng.random() < 0.5 else ["MLO", "CC"]
    dm_slots = [(side, v, True) for v in views] + [(other, v, False) for v in views]
    images = [
        ImagePlan("DM", v, lat, 0, lesion and finding != "none")
        for lat, v, lesion in sorted(dm_slots[:n_dm], key=lambda t: (t[0], t[1]))
    ]
    images += [ImagePlan("US", "", side, k + 1, True) for k in range(n_us)]
    return PatientPlan(
        index=i,
        patient_id=patient_id,
        malignant=is_mal,
        evidence=str(draws.evidence[i]),
        dm_mimic=i in draws.dm_mimic,
        us_mimic=i in draws.us_mimic,
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
