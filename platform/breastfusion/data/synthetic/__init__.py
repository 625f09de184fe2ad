"""The synthetic paired cohort: the embedded default data set for ``make demo`` and the tests.

There is no public paired DM + US data set, so the platform ships a generator whose cohort
looks like the study's (Chen et al., Sci Rep 2025: 790 patients, 205 malignant) in the ways that matter to the
pipeline: patients with several mammograms (DM) and ultrasound images (US), a patient-level
benign/malignant label, US lesion boxes for the ROI detector, mixed file formats and sizes,
and -- most important -- *designed complementarity*, so that each modality alone is imperfect
and fusing both can beat either.

No shortcuts: only the designed evidence depends on the label
-------------------------------------------------------------
The number of DM and US images, which views a patient has (and so how many show no lesion),
file formats, image sizes, breast density, lesion size and position, and the screen clutter
are drawn from the same distributions for both classes. Every patient has a finding in each
modality -- benign patients a benign one -- so "a lesion is present" is not the label; what
separates the classes is how the finding looks. ``audit.py`` measures this on a written cohort
and ``benchmarks/shortcut_baseline.py`` prints it (every non-evidence feature at chance).

Generative model (all knobs live in :class:`SynthParams`; ``difficulty`` picks a preset)
---------------------------------------------------------------------------------------
Cohort level (drawn from ``seed`` alone, in exact counts per class, so small cohorts keep the
proportions):

* ``malignant_fraction`` (205/790) of patients are malignant, so a 40-patient cohort has 10
  malignant patients (enough for 5 folds plus a 20 % holdout).
* Malignant patients get an *evidence mode* in exact proportions ``p_evidence_both``,
  ``p_evidence_dm_only`` and the rest US-only. In a modality that shows evidence, the
  finding's *suspicion* ``s`` (0 = textbook benign, 1 = textbook malignant) is drawn from
  ``suspicion_evident``; in the other modality from ``suspicion_weak`` (it looks benign).
* Benign patients carry a DM mimic with ``p_mimic_dm`` and, independently, a US mimic with
  ``p_mimic_us`` (``s`` from ``suspicion_mimic``); otherwise ``s`` is from ``suspicion_benign``.
  Evidence and mimics are independent across modalities, so the second modality separates
  "malignant with weak DM signs" from "benign with a DM mimic": with the standard preset the
  latent suspicions give an AUC of ~0.93 (DM) and ~0.88 (US) alone, ~0.97 together.
* ``p_masked`` of each class have their DM mass hidden by dense tissue (density forced to
  BI-RADS c/d, contrast near zero): malignant ones among those without DM evidence, benign
  ones among those without a DM mimic.
* ``dm_only_fraction`` / ``us_only_fraction`` of each class have a single modality.
* File formats are assigned over the whole cohort: ``dm_dicom_fraction`` of DM images are
  DICOM, ``dm_png16_fraction`` 16-bit PNG (each at least one when there are >= 10 DM images),
  the rest 8-bit grey PNG; ``us_rgb_fraction`` of US images are RGB PNG (colour screen marks),
  the rest 8-bit grey PNG.

Patient level (drawn from ``(seed, patient index)``, so a patient never depends on how many
workers render the cohort): lesion side, breast density (``density_probs``), the DM finding
kind (``finding_probs``: mass, calcifications or both), incidental scattered calcifications
(``p_benign_calcs``), the mammography unit's noise level, the image counts (1-4 DM from
``dm_count_probs``, 1-3 US from ``us_count_probs``; ~2.8 and ~1.7 per patient as in the
study) and one lesion shape shared by all views of that patient. DM views fill the lesion
side first (CC, MLO), then the contralateral side, which shows no lesion: a patient with 3 or
4 mammograms has lesion-free views whatever the label (labels are per patient, as in the
study). Every US image shows the lesion.

Evidence, drawn to survive shrinking to 48 px (sizes are fractions of the image, not pixels):

* DM mass (radius 12-18 % of the image height): low ``s`` is an oval, circumscribed,
  fat-containing (darker than tissue) mass with a thin bright capsule; high ``s`` an
  irregular, indistinct, high-density mass with 6-18 long tapering spicules (from s = 0.5),
  and thickened skin on that side. Its contrast falls with breast density (``dm_masking``).
  The glandular texture is kept faint: at 48 px it would otherwise bury the evidence (with
  its full contrast a ResNet-18 from scratch learnt DM ~0.05 AUC slower).
* DM calcifications: low ``s`` a few coarse round ones; high ``s`` up to 40 fine pleomorphic
  ones along branching lines (bright streaks when shrunk).
* US lesion (hypoechoic): aspect from wider-than-tall (s = 0) to taller-than-wide (s = 1),
  margin from smooth to angular and microlobulated with an echogenic halo, heterogeneous
  inside, posterior enhancement (s < 0.45) turning into shadowing.

DM images (portrait, ``size`` x [1, 1.25] high, [0.75, 0.95] x ``size`` wide): dark
background; breast silhouette (a half ellipse on the chest wall; taller, with a bright
pectoral-muscle triangle on MLO); fibroglandular texture thresholded to the density; the
finding in the lesion-side views; detector noise whose level varies by patient and image (it
also dominates the PNG file size, which therefore says nothing about the lesion). L images
have the chest wall on the left edge, R images are mirrored.

US images (landscape, [0.95, 1.25] x ``size`` wide, [0.75, 0.95] x ``size`` high): a scan
rectangle framed by black margins; tissue layers (skin, subcutaneous fat, wavy glandular
layer, retromammary fat, striated pectoral muscle, sometimes a rib with its shadow); depth
attenuation; multiplicative speckle; the lesion. Screen clutter outside the lesion box --
text, a depth scale, a focus marker, calipers, a grey or colour bar, a body-marker pictogram,
a logo -- never depends on the label, so a model can only use it by mistake: cropping matters.

Modules: ``params`` (knobs, presets), ``plan`` (latent truth and image lists), ``shapes``
(drawing helpers), ``dm`` / ``us`` (rendering), ``overlay`` (US screen clutter), ``writer``
(files, manifest, :func:`generate_cohort`), ``audit`` (shortcut audit), ``cli`` (the click
``synth`` command; nothing else imports click).

Files under ``out_dir``
-----------------------
* ``manifest.csv`` -- ``patient_id, modality, path, label, view, laterality, box_x0, box_y0,
  box_x1, box_y1``. Every US row has its lesion box (pixels of that image; x0/y0 inclusive,
  x1/y1 exclusive, i.e. slice bounds; the lesion plus ~8 % margin). DM rows leave the box blank
  (the ROI detector is US-only); the DM finding boxes are in ``image_truth.csv``.
* ``cohort_truth.csv`` -- per patient latent truth (evidence mode, mimics, suspicions, density,
  DM finding, masking) for scientific checks (e.g. "does fusion win on the DM-only cases?").
* ``image_truth.csv`` -- per image: format, size, whether the finding is drawn, its box.
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
