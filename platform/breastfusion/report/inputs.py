"""What a report shows (``ReportInputs``) and how it is read from a study folder.

``read_study(STUDY_DIR)`` reads the study through ``runs.StudyDir``: every input comes from a
finished stage's ``stage.json`` outputs (paths stored relative to the study), never from a
guessed layout, and nothing is recomputed (the aggregation is ``07_aggregate``'s
``aggregate.json``). What the report expects::

    STUDY_DIR/study.json                     the study (name, config)
    01_data   outputs.manifest               the cohort manifest; a synth_config.json next to
                                             it marks the built-in synthetic cohort
    02_splits outputs.splits                 splits.json
    03_roi    outputs.manifest               the cropped manifest; its folder's
                                             roi_summary.json (or outputs.roi_summary)
              outputs.detector_metrics       {"mAP50": …, "mAP50-95": …}
    07_aggregate outputs.aggregate_dir       aggregate.json (+ the oof_best.csv it lists)
    08_final  outputs.final_dir              metrics.json, predictions_holdout.csv,
                                             config.yaml, gradcam/index.csv (+ captions.json)

A stage that has not finished leaves its sections "not run"; a file that exists but cannot
be read becomes a problem shown in its section.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from breastfusion import runs
from breastfusion.errors import UserError
from breastfusion.evaluate.aggregate import load_aggregate
from breastfusion.evaluate.results import AggregateResult

SYNTH_CONFIG = "synth_config.json"  # written by data.synthetic next to its manifest
ROI_SUMMARY = "roi_summary.json"  # written by roi.crop next to the cropped manifest
GRADCAM_INDEX = "index.csv"  # written by explain.gradcam in final's gradcam/
GRADCAM_CAPTIONS = "captions.json"
RAW_COLUMNS = ("raw_file", "raw", "image_file", "raw_image")  # a raw image beside the overlay


@dataclass(frozen=True)
class GradcamImage:
    """One Grad-CAM overlay (a PNG/JPEG file), its caption and, when known, the raw image."""

    path: Path
    caption: str = ""
    raw: Path | None = None


@dataclass
class ReportInputs:
    """Everything the report can show; ``None`` / empty means "not run" for that section."""

    title: str = "breastfusion study report"
    data_source: str | None = None
    synthetic: bool = False
    manifest: pd.DataFrame | None = None
    splits: dict[str, Any] | None = None
    roi: dict[str, Any] | None = None  # roi_summary.json + detector_metrics + mode
    aggregate: AggregateResult | None = None
    oof_predictions: pd.DataFrame | None = None
    holdout_predictions: pd.DataFrame | None = None
    holdout_metrics: dict[str, Any] | None = None
    gradcam: list[GradcamImage] = field(default_factory=list)
    configs: dict[str, dict[str, Any] | str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # section id → why not readable
    n_boot: int = 1000
    seed: int = 0
    sources: dict[str, str] = field(default_factory=dict)  # what was read from where
    root: Path | None = None  # the study folder: the page shows paths relative to it


def _csv(path: Path) -> pd.DataFrame:
    from breastfusion.io import read_csv_table

    return read_csv_table(path, what="table", str_columns=("patient_id", "model"))


def _json(path: Path) -> dict[str, Any]:
    return runs.read_json(path, "file")


class _Reader:
    """Reads inputs, recording problems by section and sources by what they are; the paths
    it records are shown relative to the study folder (``inp.root``), so a moved or copied
    study's report names no old location."""

    def __init__(self, inp: ReportInputs):
        self.inp = inp
        self.root = inp.root

    def shown(self, path: Path | str) -> str:
        """``path`` relative to the study folder when it lies inside it."""
        if self.root is None:
            return str(path)
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def _strip(self, text: str) -> str:
        return text if self.root is None else text.replace(f"{self.root}/", "")

    def attempt(self, section: str, what: str, path: Path, fn: Callable[[Path], Any]) -> Any:
        """``fn(path)``, or None with the problem recorded for ``section``."""
        try:
            value = fn(path)
        except UserError as exc:
            text = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            self.inp.problems[section] = self._strip(text)
            return None
        except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError) as exc:
            self.inp.problems[section] = self._strip(f"{path}: cannot read ({exc})")
            return None
        self.inp.sources[what] = self.shown(path)
        return value


def read_study(study_dir: Path) -> ReportInputs:
    """``ReportInputs`` of a study folder, read through its stage records (see module doc)."""
    study = runs.StudyDir(Path(study_dir))
    if not study.root.is_dir():
        raise UserError(f"{study.root}: no such study folder")
    if not study.is_study():
        raise UserError(
            f"{study.root} is not a breastfusion study folder (no {runs.STUDY_FILE}); "
            "run `breastfusion run STUDY.yaml --out DIR` first"
        )
    inp = ReportInputs(root=study.root.resolve())
    r = _Reader(inp)
    meta = r.attempt("configs", "study", study.study_file, _json) or {}
    inp.title = f"breastfusion report — {meta.get('name') or study.root.resolve().name}"
    if isinstance(meta.get("config"), dict):
        inp.configs["study"] = meta["config"]
    outputs = {s: (study.stage_record(s) or {}).get("outputs") for s in runs.STAGES}
    _read_data(r, outputs["01_data"])
    if (o := outputs["02_splits"]) and o.get("splits"):
        inp.splits = r.attempt("splits", "splits", Path(o["splits"]), _json)
    _read_roi(r, outputs["03_roi"])
    if (o := outputs["07_aggregate"]) and o.get("aggregate_dir"):
        _read_aggregate(r, Path(o["aggregate_dir"]))
    if (o := outputs["08_final"]) and o.get("final_dir"):
        _read_final(r, Path(o["final_dir"]))
    return inp


def _read_data(r: _Reader, outputs: dict[str, Any] | None) -> None:
    if not outputs or not outputs.get("manifest"):
        return
    manifest = Path(outputs["manifest"])
    r.inp.manifest = r.attempt("cohort", "manifest", manifest, _csv)
    synth = manifest.parent / SYNTH_CONFIG
    if synth.is_file():
        cfg = r.attempt("cohort", "synthetic cohort", synth, _json) or {}
        r.inp.synthetic = True
        seed = cfg.get("seed", "?")
        where = r.shown(manifest.parent)
        r.inp.data_source = f"built-in synthetic cohort (seed {seed}, {where})"
    else:
        r.inp.data_source = r.shown(manifest)


def _read_roi(r: _Reader, outputs: dict[str, Any] | None) -> None:
    if not outputs:
        return
    roi: dict[str, Any] = {
        "mode": outputs.get("mode"),
        "detector_metrics": outputs.get("detector_metrics"),
    }
    path = outputs.get("roi_summary")
    if path is None and outputs.get("manifest") and outputs.get("mode") != "none":
        path = Path(outputs["manifest"]).parent / ROI_SUMMARY
    if path is not None and Path(path).is_file():
        roi["summary"] = r.attempt("roi", "ROI summary", Path(path), _json)
    r.inp.roi = roi


def _read_aggregate(r: _Reader, folder: Path) -> None:
    agg = r.attempt("backbones", "aggregate", folder, load_aggregate)
    r.inp.aggregate = agg
    if agg is not None and agg.files.get("oof_best.csv"):
        oof = folder / agg.files["oof_best.csv"]
        r.inp.oof_predictions = r.attempt("roc", "out-of-fold predictions", oof, _csv)


def _read_final(r: _Reader, final: Path) -> None:
    if (p := final / "metrics.json").is_file():
        r.inp.holdout_metrics = r.attempt("modalities", "holdout metrics", p, _json)
    if (p := final / "predictions_holdout.csv").is_file():
        r.inp.holdout_predictions = r.attempt("roc", "holdout predictions", p, _csv)
    if (p := final / "config.yaml").is_file():
        r.inp.configs["final/config.yaml"] = p.read_text(encoding="utf-8", errors="replace")
    gdir = final / "gradcam"
    if gdir.is_dir():
        r.inp.gradcam = r.attempt("gradcam", "Grad-CAM gallery", gdir, gradcam_gallery) or []


def gradcam_gallery(gdir: Path) -> list[GradcamImage]:
    """The gallery ``final`` wrote: ``index.csv`` rows (``file``; a raw image column when
    present; captions from ``captions.json``), else every image in the folder."""
    captions: dict[str, Any] = {}
    if (gdir / GRADCAM_CAPTIONS).is_file():
        captions = json.loads((gdir / GRADCAM_CAPTIONS).read_text(encoding="utf-8"))
    index = gdir / GRADCAM_INDEX
    if not index.is_file():
        return [
            GradcamImage(f, str(captions.get(f.name, f.stem.replace("_", " "))))
            for f in sorted(gdir.iterdir())
            if f.suffix.lower() in (".png", ".jpg", ".jpeg")
        ]
    df = _csv(index)
    if "file" not in df.columns:
        raise UserError(f"{index}: no 'file' column (the overlay image of each row)")
    raw_col = next((c for c in RAW_COLUMNS if c in df.columns), None)
    out = []
    for row in df.to_dict(orient="records"):
        name = str(row["file"])
        default = " · ".join(str(row[c]) for c in ("category", "patient_id", "branch") if c in row)
        raw = row.get(raw_col) if raw_col else None
        raw_path = gdir / str(raw) if isinstance(raw, str) and raw.strip() else None
        out.append(GradcamImage(gdir / name, str(captions.get(name, default or name)), raw_path))
    return out
