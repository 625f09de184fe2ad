"""Files of a cohort: image encoding (PNG, DICOM), the manifest and truth tables, the folder.

The cohort is built in a hidden temporary folder inside ``out_dir`` and moved into place with
``manifest.csv`` last, so an interrupted run never leaves a manifest that points at missing
images. No timestamps, fixed PNG compression and DICOM UIDs derived from the seed make every
file byte-identical for the same arguments, whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from breastfusion.data.manifest import KNOWN_COLUMNS
from breastfusion.data.synthetic.dm import render_dm
from breastfusion.data.synthetic.params import DENSITY_NAMES, MIN_SIZE, SynthParams, resolve_params
from breastfusion.data.synthetic.plan import ImagePlan, PatientPlan, plan_cohort
from breastfusion.data.synthetic.shapes import Box
from breastfusion.data.synthetic.us import render_us
from breastfusion.errors import UserError
from breastfusion.io import atomic_write_text, dumps_json, ensure_dir

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
Rows = list[dict[str, str]]


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


def _encode(
    img: np.ndarray, pt: PatientPlan, im: ImagePlan, seed: int, rng: np.random.Generator
) -> bytes:
    if im.fmt == "dicom":
        return _dicom(img, pt, im, seed, rng)
    if im.fmt == "png16":
        return _png(np.round(img * 16383.0).astype(np.uint16))  # 14-bit detector range
    return _png(np.round(img * 255.0).astype(np.uint8))


# ----------------------------------------------------------------------------- rendering


def render_patient(
    pt: PatientPlan, seed: int, size: int, params: SynthParams, image_dir: str
) -> tuple[Rows, Rows]:
    """Render and write one patient's images; returns (manifest rows, image-truth rows).

    The random stream depends only on ``(seed, patient index)``, so the output is the same
    whatever the number of worker processes.
    """
    rng = np.random.default_rng([seed, 2, pt.index])
    rows: Rows = []
    truth: Rows = []
    for im in pt.images:
        name = f"{pt.patient_id}_{im.filename}"
        if im.modality == "DM":
            img, box = render_dm(rng, pt, im, params, size)
            manifest_box: Box | None = None  # the ROI detector is US-only
        else:
            img, box = render_us(rng, pt, im, params, size)
            manifest_box = box
        data = _encode(img, pt, im, seed, rng)
        with open(os.path.join(image_dir, name), "wb") as fh:
            fh.write(data)
        rel = f"images/{name}"
        hgt, wid = img.shape[:2]
        common = {
            "patient_id": pt.patient_id,
            "modality": im.modality,
            "path": rel,
            "view": im.view,
            "laterality": im.laterality,
        }
        rows.append({**common, "label": pt.label, **_box_cols("box_", manifest_box)})
        truth.append(
            {
                **common,
                "format": im.fmt,
                "width": str(wid),
                "height": str(hgt),
                "lesion_visible": str(int(box is not None)),
                **_box_cols("lesion_", box),
            }
        )
    return rows, truth


def _box_cols(prefix: str, box: Box | None) -> dict[str, str]:
    keys = [f"{prefix}{k}" for k in ("x0", "y0", "x1", "y1")]
    return dict(zip(keys, [str(v) for v in box] if box else ["", "", "", ""], strict=True))


def _render_batch(
    args: tuple[list[PatientPlan], int, int, SynthParams, str],
) -> list[tuple[Rows, Rows]]:
    plans, seed, size, params, image_dir = args
    return [render_patient(p, seed, size, params, image_dir) for p in plans]


def _render_all(
    plans: list[PatientPlan], seed: int, size: int, prm: SynthParams, image_dir: str, workers: int
) -> list[tuple[Rows, Rows]]:
    if workers <= 1:
        return [render_patient(p, seed, size, prm, image_dir) for p in plans]
    chunk = max(1, math.ceil(len(plans) / (workers * 8)))
    batches = [
        (plans[k : k + chunk], seed, size, prm, image_dir) for k in range(0, len(plans), chunk)
    ]
    # spawn, not fork: the caller may hold torch/BLAS threads that fork would break.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return [r for batch in pool.map(_render_batch, batches) for r in batch]


# ----------------------------------------------------------------------------- tables


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
        "density": DENSITY_NAMES[p.density],
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


# ----------------------------------------------------------------------------- the cohort


def _check_arguments(n_patients: int, size: int) -> None:
    if n_patients < 1:
        raise UserError(f"data.synthetic.patients must be at least 1 (got {n_patients})")
    if size < MIN_SIZE:
        raise UserError(f"data.synthetic.size must be at least {MIN_SIZE} px (got {size})")


def _check_out(out: Path) -> None:
    images = out / "images"
    if images.exists() and any(images.iterdir()) and not (out / "cohort_truth.csv").exists():
        raise UserError(
            f"{images} exists and is not a synthetic cohort made by 'breastfusion synth'; "
            "choose an empty output folder"
        )


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
    _check_arguments(n_patients, size)
    prm = params if params is not None else resolve_params(difficulty)
    out = ensure_dir(out_dir)
    _check_out(out)
    manifest = out / "manifest.csv"
    # No manifest may outlive the images it lists, even if we are interrupted from here on.
    manifest.unlink(missing_ok=True)

    plans = plan_cohort(n_patients, seed, prm)
    if workers is None:
        workers = 1 if n_patients < 150 else max(1, min(2, os.cpu_count() or 1))
    config = {
        "generator": "breastfusion.data.synthetic",
        "n_patients": n_patients,
        "seed": seed,
        "size": size,
        "difficulty": difficulty if params is None else "custom",
        "params": asdict(prm),
    }
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=out))
    try:
        (tmp / "images").mkdir()
        results = _render_all(plans, seed, size, prm, str(tmp / "images"), workers)
        tables = {
            "cohort_truth.csv": _csv_text(TRUTH_COLUMNS, [_truth_row(p) for p in plans]),
            "image_truth.csv": _csv_text(IMAGE_TRUTH_COLUMNS, [t for _, ts in results for t in ts]),
            "synth_config.json": dumps_json(config),
        }
        for name, text in tables.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if (out / "images").exists():
            shutil.rmtree(out / "images")
        os.replace(tmp / "images", out / "images")
        for name in tables:
            os.replace(tmp / name, out / name)
        rows = [row for rs, _ in results for row in rs]
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
