"""The knobs of the generative model (:class:`SynthParams`) and the ``difficulty`` presets."""

from __future__ import annotations

from dataclasses import dataclass

from breastfusion.errors import UserError

DIFFICULTIES = ("easy", "standard", "hard")
MIN_SIZE = 24
DENSITY_NAMES = ("a", "b", "c", "d")
DENSITY_FRACTION = (0.15, 0.35, 0.55, 0.75)  # share of the glandular region that is dense
DENSITY_MASKING = (0.0, 0.25, 0.6, 1.0)  # scales dm_masking: how much mass contrast is lost


@dataclass(frozen=True)
class SynthParams:
    """Parameters of the generative model (see the package docstring for their meaning).

    Nothing about a patient's images other than the designed evidence depends on the label:
    image counts, views, formats and sizes are drawn from the same distributions for both
    classes, and every patient has a finding in each modality (benign patients a benign one).
    """

    # --- cohort composition (the study's proportions, the same for both classes) ---
    malignant_fraction: float = 205 / 790
    dm_count_probs: tuple[float, ...] = (0.08, 0.40, 0.20, 0.32)  # P(1..4 DM images): ~2.8
    us_count_probs: tuple[float, ...] = (0.45, 0.40, 0.15)  # P(1..3 US images): ~1.7
    dm_only_fraction: float = 0.03
    us_only_fraction: float = 0.02
    density_probs: tuple[float, ...] = (0.10, 0.40, 0.40, 0.10)  # BI-RADS a..d
    finding_probs: tuple[float, float, float] = (0.60, 0.15, 0.25)  # DM mass / calc / both
    p_benign_calcs: float = 0.25  # incidental scattered round calcifications
    # --- designed complementarity ---
    p_evidence_both: float = 0.60
    p_evidence_dm_only: float = 0.25  # the rest: evidence in US only
    p_masked: float = 0.08  # of each class: the DM mass is hidden by dense tissue
    p_mimic_dm: float = 0.10  # benign patients whose DM finding looks suspicious
    p_mimic_us: float = 0.14  # ... whose US lesion does (independent of the DM mimic)
    suspicion_evident: tuple[float, float] = (0.6, 1.0)
    suspicion_weak: tuple[float, float] = (0.1, 0.5)
    suspicion_benign: tuple[float, float] = (0.0, 0.4)
    suspicion_mimic: tuple[float, float] = (0.5, 0.85)
    # --- appearance ---
    dm_mass_contrast: float = 0.3
    dm_masking: float = 0.6
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
    # The demo's preset: evidence that 48 px models learn in a few CPU epochs, in both
    # modalities for most malignant patients and in one of them for one in eight. (With one
    # in five, ~13% of malignant patients showed nothing a 5-epoch DM model learns, so no
    # DM threshold reached sensitivity 0.9 with specificity above 0.35.)
    "easy": SynthParams(
        p_evidence_both=0.84,
        p_evidence_dm_only=0.09,
        p_masked=0.02,
        p_mimic_dm=0.06,
        p_mimic_us=0.06,
        suspicion_evident=(0.65, 1.0),
        suspicion_weak=(0.15, 0.5),
        suspicion_benign=(0.0, 0.35),
        dm_mass_contrast=0.4,
        dm_masking=0.35,
        dm_noise=0.01,
        us_speckle=0.45,
        us_noise=0.02,
    ),
    "hard": SynthParams(
        p_evidence_both=0.4,
        p_evidence_dm_only=0.3,
        p_masked=0.12,
        p_mimic_dm=0.18,
        p_mimic_us=0.18,
        suspicion_evident=(0.55, 0.95),
        suspicion_weak=(0.05, 0.5),
        suspicion_benign=(0.0, 0.45),
        suspicion_mimic=(0.45, 0.85),
        dm_mass_contrast=0.24,
        dm_masking=0.75,
        dm_calc_amplitude=0.32,
        dm_noise=0.025,
        us_lesion_contrast=0.65,
        us_speckle=0.65,
        us_noise=0.05,
    ),
}


def resolve_params(difficulty: str) -> SynthParams:
    """The preset named ``difficulty`` (the study key ``data.synthetic.difficulty``)."""
    try:
        return PRESETS[difficulty]
    except KeyError:
        raise UserError(
            f"data.synthetic.difficulty: unknown difficulty {difficulty!r}; "
            f"choose one of {', '.join(DIFFICULTIES)}"
        ) from None
