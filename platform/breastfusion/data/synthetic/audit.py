"""Shortcut audit of a written cohort: how much each *non-evidence* feature says about the label.

A model should separate the classes by the designed evidence (lesion shape and margin,
calcification morphology, US orientation and posterior features), never by how many images a
patient has, which file formats or sizes they come in, or whether a view shows a lesion at
all. :func:`shortcut_features` reads those features back from the written files (the file
suffix, the PNG mode and the file size on disk, as a pipeline would see them; the lesion
flags from ``image_truth.csv``); :func:`feature_aucs` scores each against the patient label
(0.5 = no information; 1 or 0 = the feature alone separates the classes).
:func:`evidence_aucs` scores the hidden evidence in ``cohort_truth.csv``: the ceiling a model
is read against.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

NON_EVIDENCE = (
    "n_dm",
    "n_us",
    "n_images",
    "lesion_free_share",
    "lesion_free_share_dm",
    "share_dicom",
    "share_png16",
    "share_png8",
    "share_rgb",
    "mean_file_kb",
    "mean_file_kb_dm",
    "mean_file_kb_us",
    "mean_pixels",
    "mean_pixels_dm",
    "mean_pixels_us",
)


def _file_kind(path: Path) -> tuple[str, int]:
    """(format as a reader sees it, pixel count) of one image file."""
    if path.suffix.lower() == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return "dicom", int(ds.Rows) * int(ds.Columns)
    with Image.open(path) as im:  # the header only
        mode, (w, h) = im.mode, im.size
    kind = "rgb" if mode == "RGB" else "png16" if mode.startswith("I") else "png8"
    return kind, w * h


def image_features(manifest: str | os.PathLike) -> pd.DataFrame:
    """One row per image: patient, label, modality, format, pixels, bytes, lesion flag."""
    root = Path(manifest).parent
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    truth = pd.read_csv(root / "image_truth.csv", dtype=str, keep_default_na=False)
    visible = dict(zip(truth["path"], truth["lesion_visible"] == "1", strict=True))
    out = []
    for r in rows.itertuples(index=False):
        path = root / r.path
        kind, pixels = _file_kind(path)
        out.append(
            {
                "patient_id": r.patient_id,
                "y": int(r.label == "malignant"),
                "modality": r.modality,
                "format": kind,
                "pixels": pixels,
                "kb": path.stat().st_size / 1024.0,
                "lesion_free": not visible[r.path],
            }
        )
    return pd.DataFrame(out)


def shortcut_features(manifest: str | os.PathLike) -> pd.DataFrame:
    """Per-patient non-evidence features (index ``patient_id``; columns ``y`` + NON_EVIDENCE).

    A per-modality feature is NaN for a patient without that modality.
    """
    img = image_features(manifest)
    g = img.groupby("patient_id", sort=True)
    feats = pd.DataFrame({"y": g["y"].first()})
    for mod in ("DM", "US"):
        sub = img[img["modality"] == mod].groupby("patient_id")
        feats[f"n_{mod.lower()}"] = sub.size().reindex(feats.index, fill_value=0)
        feats[f"mean_file_kb_{mod.lower()}"] = sub["kb"].mean()
        feats[f"mean_pixels_{mod.lower()}"] = sub["pixels"].mean()
    feats["n_images"] = g.size()
    feats["lesion_free_share"] = g["lesion_free"].mean()
    dm = img[img["modality"] == "DM"].groupby("patient_id")
    feats["lesion_free_share_dm"] = dm["lesion_free"].mean()
    for kind in ("dicom", "png16", "png8", "rgb"):
        feats[f"share_{kind}"] = g["format"].apply(lambda f, k=kind: float(np.mean(f == k)))
    feats["mean_file_kb"] = g["kb"].mean()
    feats["mean_pixels"] = g["pixels"].mean()
    return feats[["y", *NON_EVIDENCE]]


def auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC over the rows where ``score`` is known (None when a class is missing)."""
    from sklearn.metrics import roc_auc_score

    y, score = np.asarray(y), np.asarray(score, dtype=float)
    keep = np.isfinite(score)
    if len(set(y[keep].tolist())) < 2:
        return None
    return float(roc_auc_score(y[keep], score[keep]))


def feature_aucs(feats: pd.DataFrame) -> dict[str, float | None]:
    """AUC of each non-evidence feature against the patient label."""
    return {c: auc(feats["y"].to_numpy(), feats[c].to_numpy()) for c in NON_EVIDENCE}


def evidence_aucs(cohort_truth: str | os.PathLike, seed: int = 0) -> dict[str, float | None]:
    """AUC of the hidden evidence: each modality's suspicion, their max and a logistic fit.

    The logistic combination is cross-validated (5 stratified folds), so it is a ceiling a
    model could reach, not an in-sample fit.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    t = pd.read_csv(cohort_truth, dtype={"patient_id": str})
    y = (t["label"] == "malignant").astype(int).to_numpy()
    dm, us = t["dm_suspicion"].to_numpy(float), t["us_suspicion"].to_numpy(float)
    x = np.c_[dm, us, dm * us]
    out: dict[str, float | None] = {
        "evidence_dm": auc(y, dm),
        "evidence_us": auc(y, us),
        "evidence_max": auc(y, np.maximum(dm, us)),
        "evidence_logistic": None,
    }
    n_min = int(min(y.sum(), len(y) - y.sum()))
    if n_min >= 5:
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
        prob = cross_val_predict(
            LogisticRegression(C=10.0, max_iter=1000), x, y, cv=folds, method="predict_proba"
        )[:, 1]
        out["evidence_logistic"] = auc(y, prob)
    return out
