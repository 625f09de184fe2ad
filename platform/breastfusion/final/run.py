"""``final``: the chosen configuration → one calibrated model, one holdout evaluation, a bundle.

Steps (:func:`final_model`):

1. **Operating point** (``final.operating``): with ``final.target_sensitivity``, the largest
   threshold reaching it on the chosen trial's pooled *calibrated* out-of-fold scores;
   checked, and warned about when it is reached only by calling nearly everyone malignant.
2. **Train** (``final.refit``): ``refit`` trains the configuration on every development
   patient and carries the mean fold calibration (its threshold is transferred from the fold
   models); ``ensemble`` averages the fold models' calibrated log-odds.
3. **Holdout, once**: the untouched holdout patients are scored (mean calibrated log-odds
   over a patient's samples) and evaluated (``final.evaluation``) at that threshold.
4. **Export**: ``OUT/bundle/`` (``final.bundle``: weights, ONNX, detector, ``metadata.json``)
   with no patient ids; beside it ``predictions_holdout.csv``, ``oof_development.csv``,
   ``metrics.*``, ``config.yaml`` and the Grad-CAM gallery, and last ``final.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion.final.choice import Choice, locate_best
from breastfusion.final.settings import FinalSettings

if TYPE_CHECKING:
    import pandas as pd

    from breastfusion.config import Config
    from breastfusion.roi.settings import CropSettings

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
DONE_FILE = "final.json"
OUTPUTS = (
    "bundle",
    "predictions_holdout.csv",
    "oof_development.csv",
    "metrics.json",
    "metrics.md",
    "reliability.png",
    "patient_scores.csv",
    "config.yaml",
    "gradcam",
    DONE_FILE,
)


@dataclass
class FinalResult:
    """What ``final_model`` wrote to ``out`` and the numbers in it."""

    out: Path
    bundle: Path
    mode: str
    model_name: str
    threshold: float  # calibrated log-odds
    operating_point: dict[str, Any]
    metrics: dict[str, Any]  # metrics.json
    predictions: pd.DataFrame  # holdout, one row per patient
    metadata: dict[str, Any]  # bundle/metadata.json
    train_patients: tuple[str, ...]
    holdout_patients: tuple[str, ...]
    warnings: list[str] = field(default_factory=list)
    gradcam: pd.DataFrame | None = None

    @property
    def headline(self) -> str:
        m = self.metrics["models"][self.model_name]

        def ci(d: dict[str, Any]) -> str:
            return f"{d['value']:.3f} ({d['ci_low']:.3f}–{d['ci_high']:.3f})"

        def pct(d: dict[str, Any]) -> str:
            return "n/a" if d["value"] is None else f"{d['value']:.3f}"

        return (
            f"holdout ({m['n_patients']} patients, {m['n_malignant']} malignant): AUC "
            f"{ci(m['auc'])}, sensitivity {pct(m['sensitivity'])}, specificity "
            f"{pct(m['specificity'])} at threshold {self.threshold:.3g} (calibrated log-odds; "
            f"probability {self.operating_point['threshold_probability']:.3g})"
        )


def resolve_config(
    config: Config | Mapping[str, Any], manifest: Any, splits: Any, device: str | None
) -> Config:
    from breastfusion.config import Config
    from breastfusion.errors import ConfigError

    cfg = config if isinstance(config, Config) else Config.from_dict(dict(config))
    overrides: dict[str, Any] = {}
    if manifest is not None:
        overrides["data.manifest"] = str(Path(manifest).resolve())
    if splits is not None:
        overrides["data.splits"] = str(Path(splits).resolve())
    if device is not None:
        overrides["train.device"] = device if device in ("auto", "cpu", "cuda") else "cuda"
    cfg = cfg.with_overrides(overrides) if overrides else cfg
    if not cfg.data.manifest or not cfg.data.splits:
        raise ConfigError("final needs the cohort: data.manifest and data.splits (or --manifest "
                          "and --splits)")  # fmt: skip
    return cfg


def final_model(
    choice: Choice,
    out: str | os.PathLike,
    *,
    manifest: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    settings: FinalSettings | Mapping[str, Any] | None = None,
    detector_dir: str | os.PathLike | None = None,
    crop_settings: CropSettings | Mapping[str, Any] | None = None,
    fallbacks: Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> FinalResult:
    """Train or assemble the chosen model, evaluate it once on the holdout, export the bundle
    (module doc). ``manifest``/``splits`` override the config's (the study passes the cropped
    manifest). ``detector_dir``: a detector bundle (``roi.bundle.export_detector``) copied
    into the bundle so ``predict`` crops raw US images as the study did; ``crop_settings``
    without a detector: US crops came from manifest boxes. ``fallbacks``: ``{"dm": DIR, "us":
    DIR}``, single-modal bundles ``predict`` uses for patients lacking a modality (stored
    relative to the bundle)."""
    from breastfusion.final import pipeline

    s = settings if isinstance(settings, FinalSettings) else FinalSettings.from_dict(settings)
    say = progress or (lambda line: log.info("%s", line))
    cfg = resolve_config(choice.config, manifest, splits, s.device)
    plan = pipeline.prepare(cfg, choice, s, detector_dir, crop_settings, say)
    return pipeline.execute(plan, Path(out), fallbacks or {}, overwrite, say)


def final_from_best(
    best: str | os.PathLike | Mapping[str, Any],
    *,
    out: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    search_dir: str | os.PathLike | None = None,
    settings: FinalSettings | Mapping[str, Any] | None = None,
    debug: bool = False,
    detector_dir: str | os.PathLike | None = None,
    crop_settings: CropSettings | Mapping[str, Any] | None = None,
    fallbacks: Mapping[str, str | os.PathLike] | None = None,
    progress: Progress | None = None,
) -> FinalResult:
    """``final_model`` for a search's choice (``choice.locate_best``). ``settings``: the
    study's ``final:`` block (``FinalSettings`` keys); ``debug`` lowers the bootstrap and
    gallery sizes unless they are set."""
    if not isinstance(settings, FinalSettings):
        settings = FinalSettings.from_dict(settings, debug=debug)
    choice = locate_best(best, search_dir)
    return final_model(
        choice,
        out,
        manifest=manifest,
        splits=splits,
        settings=settings,
        detector_dir=detector_dir,
        crop_settings=crop_settings,
        fallbacks=fallbacks,
        progress=progress,
    )
