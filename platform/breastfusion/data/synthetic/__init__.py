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

from breastfusion.data.synthetic.params import (
    DIFFICULTIES,
    MIN_SIZE,
    PRESETS,
    SynthParams,
    resolve_params,
)
from breastfusion.data.synthetic.plan import ImagePlan, PatientPlan, plan_cohort
from breastfusion.data.synthetic.writer import (
    IMAGE_TRUTH_COLUMNS,
    MANIFEST_COLUMNS,
    TRUTH_COLUMNS,
    generate_cohort,
    render_patient,
    summarize,
)

__all__ = [
    "DIFFICULTIES",
    "IMAGE_TRUTH_COLUMNS",
    "MANIFEST_COLUMNS",
    "MIN_SIZE",
    "PRESETS",
    "TRUTH_COLUMNS",
    "ImagePlan",
    "PatientPlan",
    "SynthParams",
    "generate_cohort",
    "plan_cohort",
    "render_patient",
    "resolve_params",
    "summarize",
]
