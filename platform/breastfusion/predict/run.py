"""``predict``: score patients with an exported bundle, exactly as the study scored its own.

For each bundle: its ROI step on raw US images (``predict.images``), the engine's datasets
with the bundle's preprocessing, its network (torch or onnxruntime), its calibration and
operating point. Patients lacking a modality the model needs are scored by the bundle's
single-modal fallback bundle when it names one and it is there, else reported as not scored.

Outputs in ``out`` (claimed and locked; published only when complete, ``predict.json`` last):
``predictions.csv`` (one row per patient), ``images.csv`` (one row per input image), with
``--evaluate`` ``metrics.json``/``metrics.md``/``reliability.png``/``patient_scores.csv``,
and with ``gradcam`` a gallery.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.errors import UserError
from breastfusion.final.bundle import Bundle, read_bundle
from breastfusion.final.scoring import BACKENDS
from breastfusion.predict.images import RoiStep, prepare
from breastfusion.predict.inputs import Inputs, read_inputs

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
DONE_FILE = "predict.json"
OUTPUTS = ("predictions.csv", "images.csv", "metrics.json", "metrics.md", "reliability.png",
           "patient_scores.csv", "gradcam", DONE_FILE)  # fmt: skip
SCORED = "scored"
LABEL = {"dm": "DM-only", "us": "US-only", "fusion": "DM+US"}


@dataclass
class PredictResult:
    out: Path
    predictions: pd.DataFrame
    images: pd.DataFrame
    metrics: dict[str, Any] | None

    @property
    def summary(self) -> str:
        counts = self.predictions["status"].value_counts()
        return "; ".join(f"{n} {s}" for s, n in counts.items())


@dataclass
class Scored:
    bundle: Bundle
    scores: pd.DataFrame  # patient_id, y_score, n_samples
    excluded: dict[str, str]  # patient -> why the model could not score it
    dataset: Any
    images: pd.DataFrame


def score_with(
    bundle: Bundle,
    inputs: Inputs,
    patients: list[str],
    work: Path,
    backend: str,
    device: str | None,
) -> Scored:
    """One bundle's scores for ``patients`` (those it can score; the rest in ``excluded``)."""
    from breastfusion.engine.data import build_dataset
    from breastfusion.final.scoring import score_dataset

    step = RoiStep(bundle.roi, bundle.path, work, device)
    rows = inputs.table[inputs.table["patient_id"].isin(set(patients))]
    prepared = prepare(rows, [b.upper() for b in bundle.branches], step)
    have = set(prepared.table["patient_id"])
    excluded = {p: _why_unreadable(prepared.images, p) for p in patients if p not in have}
    ids = [p for p in patients if p in have]
    empty = pd.DataFrame(columns=["patient_id", "y_score", "n_samples"])
    if not ids:
        return Scored(bundle, empty, excluded, None, prepared.images)
    cfg = bundle.config
    ds = build_dataset(cfg, prepared.table, ids, train=False, cache=work / "cache")
    excluded.update(ds.excluded)
    if len(ds) == 0:
        return Scored(bundle, empty, excluded, ds, prepared.images)
    runner = bundle.runner(backend, device)
    scores = score_dataset(runner, ds, bundle.branches, cfg.optim.batch_size)
    return Scored(
        bundle, scores[["patient_id", "y_score", "n_samples"]], excluded, ds, prepared.images
    )


def _why_unreadable(images: pd.DataFrame, patient: str) -> str:
    rows = images[images["patient_id"] == patient]
    used = rows[~rows["status"].str.startswith("not used")]
    if used.empty:
        return "no " + " or ".join(sorted(set(rows["modality"]) ^ {"DM", "US"})) + " image"
    return "no usable image (" + "; ".join(sorted(set(used["status"].str.split(":").str[0]))) + ")"


def _fallback_for(bundle: Bundle, why: str) -> tuple[str | None, Path | None]:
    """The modality whose single-modal bundle could score a patient the model could not."""
    if bundle.modality != "fusion":
        return None, None
    modality = "dm" if why == "no US image" else "us" if why == "no DM image" else None
    return modality, bundle.fallback(modality) if modality else None


def predict(
    bundle_dir: str | os.PathLike,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    evaluate: bool = False,
    backend: str = "torch",
    gradcam: int = 0,
    device: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: Progress | None = None,
) -> PredictResult:
    """Score ``source`` (a manifest or an image folder, ``predict.inputs``) with the bundle at
    ``bundle_dir`` and write the outputs to ``out`` (module doc)."""
    from breastfusion.final.outdir import staged_output
    from breastfusion.predict.writing import write_outputs

    say = progress or (lambda line: log.info("%s", line))
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if isinstance(gradcam, bool) or not isinstance(gradcam, int) or gradcam < 0:
        raise UserError(f"gradcam must be an integer >= 0, got {gradcam!r}")
    bundle = read_bundle(bundle_dir)
    inputs = read_inputs(source)
    if evaluate and not inputs.labelled:
        raise UserError(f"{inputs.source}: evaluation needs a label (benign/malignant) for every "
                        "patient")  # fmt: skip
    say(f"{len(inputs.patients)} patients, {len(inputs.table)} images; model {bundle.name}")
    with tempfile.TemporaryDirectory(prefix="breastfusion-predict-") as tmp:
        scored = _score_all(bundle, inputs, Path(tmp), backend, device, say)
        table = patient_table(bundle, inputs, scored)
        with staged_output(out, "predict", OUTPUTS, DONE_FILE) as staging:
            metrics = write_outputs(
                staging, bundle, inputs, table, scored, evaluate, gradcam, n_boot, seed, say
            )
    result = PredictResult(Path(out), table, scored[0].images, metrics)
    say(f"predictions: {result.summary}; written to {out}")
    return result


def _score_all(
    bundle: Bundle, inputs: Inputs, work: Path, backend: str, device: str | None, say: Progress
) -> list[Scored]:
    main = score_with(bundle, inputs, inputs.patients, work / "main", backend, device)
    results = [main]
    for modality in ("dm", "us"):
        ids = [p for p, why in main.excluded.items() if _fallback_for(bundle, why)[0] == modality]
        path = bundle.fallback(modality)
        if not ids or path is None or not path.is_dir():
            continue
        fallback = read_bundle(path)
        say(f"{len(ids)} patient(s) lack a modality: scoring them with {fallback.name} ({path})")
        results.append(score_with(fallback, inputs, ids, work / modality, backend, device))
    return results


def patient_table(bundle: Bundle, inputs: Inputs, scored: list[Scored]) -> pd.DataFrame:
    """``predictions.csv``: one row per input patient, in input order, with a status."""
    from breastfusion.evaluate.calibration import sigmoid

    images = scored[0].images
    rows = []
    for pid in inputs.patients:
        row = _patient_row(bundle, pid, scored)
        mine = images[(images["patient_id"] == pid) & (images["status"] == "used")]
        row["modalities"] = "+".join(sorted(set(mine["modality"]))) or ""
        row["n_images"] = int(len(mine))
        rows.append(row)
    table = pd.DataFrame(rows)
    s = table["y_score"].to_numpy(dtype=np.float64)
    table["probability"] = np.where(np.isnan(s), np.nan, sigmoid(np.nan_to_num(s)))
    labels = inputs.table.groupby("patient_id", sort=False)["y"].first()
    cols = ["patient_id", "y_score", "probability", "call"]
    if labels.notna().any():
        table["y_true"] = table["patient_id"].map(labels).astype("Int64")
        cols.append("y_true")
    cols += ["model", "modalities", "n_images", "n_samples", "threshold", "status"]
    return table[cols]


def _patient_row(bundle: Bundle, pid: str, scored: list[Scored]) -> dict[str, Any]:
    blank = {"patient_id": pid, "y_score": np.nan, "call": "", "model": "", "n_samples": 0,
             "threshold": np.nan}  # fmt: skip
    why = scored[0].excluded.get(pid)
    for i, s in enumerate(scored):
        hit = s.scores[s.scores["patient_id"] == pid]
        if hit.empty:
            continue
        score, thr = float(hit["y_score"].iloc[0]), s.bundle.threshold
        status = SCORED if i == 0 else (
            f"scored by the {LABEL[s.bundle.modality]} model ({why})")  # fmt: skip
        return {**blank, "y_score": score, "call": "malignant" if score >= thr else "benign",
                "model": s.bundle.name, "n_samples": int(hit["n_samples"].iloc[0]),
                "threshold": thr, "status": status}  # fmt: skip
    modality, path = _fallback_for(bundle, why or "")
    note = ""
    if modality is not None:
        note = f"; no {LABEL[modality]} bundle" + (f" at {path}" if path else " named by this one")
    return {**blank, "status": f"not scored: {why}{note}"}
