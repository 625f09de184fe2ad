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
    dm_finding: str  # mass | calc | mass+calc (every patient has one, benign ones benign)
    dm_masked: bool
    dm_s: float
    us_s: float
    density: int  # 0..3 = BI-RADS a..d
    side: str
    benign_calcs: bool
    lesion_seed: int
    noise_gain: float = 1.0  # the patient's mammography unit: scales the DM detector noise
    images: tuple[ImagePlan, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return "malignant" if self.malignant else "benign"


@dataclass(frozen=True)
class _CohortDraws:
    """The cohort-level assignments every patient plan reads (exact counts per class)."""

    malignant: np.ndarray  # bool per patient
    evidence: np.ndarray  # object per patient: both | dm | us | none
    dm_mimic: set[int]
    us_mimic: set[int]
    masked: set[int]
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


def _pick(rng: np.random.Generator, pool: np.ndarray, k: int) -> set[int]:
    k = min(len(pool), max(0, k))
    return set(rng.choice(pool, size=k, replace=False).tolist()) if k else set()


def _per_class(
    rng: np.random.Generator, classes: tuple[np.ndarray, np.ndarray], frac: float
) -> set[int]:
    """``frac`` of each class (rounded per class), so the choice carries no label."""
    return _pick(rng, classes[0], round(frac * len(classes[0]))) | _pick(
        rng, classes[1], round(frac * len(classes[1]))
    )


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

    n_mimic_dm = round(params.p_mimic_dm * len(ben_idx))
    dm_mimic = _pick(rng, ben_idx, n_mimic_dm)
    us_mimic = _pick(rng, ben_idx, round(params.p_mimic_us * len(ben_idx)))
    # Dense tissue hides the DM mass of the same share of each class: of malignant patients
    # whose DM shows no evidence, of benign patients whose DM finding is not a mimic.
    no_dm_evidence = mal_idx[evidence[mal_idx] == "us"]
    plain = np.setdiff1d(ben_idx, sorted(dm_mimic))
    masked = _pick(rng, no_dm_evidence, round(params.p_masked * len(mal_idx)))
    masked |= _pick(rng, plain, round(params.p_masked * len(ben_idx)))
    dm_only = _per_class(rng, (mal_idx, ben_idx), params.dm_only_fraction)
    rest = (np.setdiff1d(mal_idx, sorted(dm_only)), np.setdiff1d(ben_idx, sorted(dm_only)))
    us_only = _per_class(rng, rest, params.us_only_fraction)
    return _CohortDraws(malignant, evidence, dm_mimic, us_mimic, masked, dm_only, us_only)


def plan_cohort(n_patients: int, seed: int, params: SynthParams) -> list[PatientPlan]:
    """Draw every patient's latent truth and image list (cheap; no pixels)."""
    rng = np.random.default_rng([seed, 0])
    draws = _cohort_draws(n_patients, rng, params)
    width = max(4, len(str(n_patients)))
    plans = [
        _plan_patient(i, f"P{i + 1:0{width}d}", seed, draws, params) for i in range(n_patients)
    ]
    return _assign_formats(plans, rng, params)


def _suspicions(
    prng: np.random.Generator, i: int, draws: _CohortDraws, params: SynthParams
) -> tuple[float, float]:
    """(DM, US) suspicion of patient ``i``: how malignant each modality's finding looks."""
    if draws.malignant[i]:
        mode = str(draws.evidence[i])
        dm = params.suspicion_evident if mode in ("both", "dm") else params.suspicion_weak
        us = params.suspicion_evident if mode in ("both", "us") else params.suspicion_weak
    else:
        dm = params.suspicion_mimic if i in draws.dm_mimic else params.suspicion_benign
        us = params.suspicion_mimic if i in draws.us_mimic else params.suspicion_benign
    return _uniform(prng, dm), _uniform(prng, us)


def _count(prng: np.random.Generator, probs: Sequence[float]) -> int:
    return 1 + int(prng.choice(len(probs), p=np.asarray(probs) / sum(probs)))


def _images(prng: np.random.Generator, side: str, n_dm: int, n_us: int) -> tuple[ImagePlan, ...]:
    """The lesion-side DM views first (CC and MLO), then the contralateral ones (no lesion);
    every US image shows the lesion. Which views exist depends on the counts alone."""
    other = "R" if side == "L" else "L"
    views = ["CC", "MLO"] if prng.random() < 0.5 else ["MLO", "CC"]
    dm_slots = [(side, v, True) for v in views] + [(other, v, False) for v in views]
    images = [
        ImagePlan("DM", v, lat, 0, lesion)
        for lat, v, lesion in sorted(dm_slots[:n_dm], key=lambda t: (t[0], t[1]))
    ]
    images += [ImagePlan("US", "", side, k + 1, True) for k in range(n_us)]
    return tuple(images)


def _plan_patient(
    i: int, patient_id: str, seed: int, draws: _CohortDraws, params: SynthParams
) -> PatientPlan:
    prng = np.random.default_rng([seed, 1, i])
    side = "L" if prng.random() < 0.5 else "R"
    density = int(prng.choice(4, p=np.asarray(params.density_probs) / sum(params.density_probs)))
    dm_s, us_s = _suspicions(prng, i, draws, params)
    kind = int(prng.choice(3, p=np.asarray(params.finding_probs) / sum(params.finding_probs)))
    finding = ("mass", "calc", "mass+calc")[kind]
    masked = i in draws.masked
    if masked:  # a mass hidden by dense tissue, and nothing else to see
        finding = "mass"
        density = max(density, 2 + int(prng.random() < 0.4))
    benign_calcs = bool(prng.random() < params.p_benign_calcs)
    lesion_seed = int(prng.integers(0, 2**62))
    noise_gain = float(2.0 ** prng.uniform(-1.5, 2.0))
    n_dm = 0 if i in draws.us_only else _count(prng, params.dm_count_probs)
    n_us = 0 if i in draws.dm_only else _count(prng, params.us_count_probs)
    return PatientPlan(
        index=i,
        patient_id=patient_id,
        malignant=bool(draws.malignant[i]),
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
        noise_gain=noise_gain,
        images=_images(prng, side, n_dm, n_us),
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
