"""``breastfusion aggregate``: search folders → per-configuration results, study tables, best config.

Input: one or more search folders written by ``breastfusion search`` (``experiment.json``,
``trials.csv``, ``trials/<trial>/oof_predictions.csv`` and ``trials/<trial>/fold<k>/...``).
A configuration is one trial. For each complete trial (every fold finished) this computes

* the fold-wise mean ± SD of the patient-level validation AUC (what the search optimised);
* the pooled out-of-fold (OOF) AUC over all development patients, with a stratified patient
  bootstrap 95% CI (seeded), and sensitivity / specificity / precision / accuracy at a fixed
  threshold (0.5) with Wilson intervals.

The pooled OOF AUC ranks patients scored by K different fold models on one scale, so it is
lower than the fold mean when the folds' models are calibrated differently; it is reported
because it is the only single-number estimate with a patient-level CI. Both numbers are
cross-validation estimates that were also used to *choose* configurations: they are
optimistic for the chosen one. The untouched holdout (``breastfusion final``) is the honest
number.

Outputs in ``--out DIR``:

* ``tables/table1_dm_backbones.{csv,md}``, ``tables/table2_us_backbones.{csv,md}``: the study's
  Tables 1 and 2 (rows = backbone; the best trial of that backbone when a search tried several
  configurations of it), ``tables/fusion_backbones.{csv,md}`` (DM+US backbone pairs),
  ``tables/table3_modalities.{csv,md}`` (DM only, US only, DM+US: the best configuration of each
  modality across all given searches) with ``tables/table3_comparisons.{csv,md}`` (paired DeLong
  tests on the OOF patients the two configurations share), ``tables/trials.{csv,md}`` (every
  trial of every search).
* ``best_config.json``: the chosen configuration — its full resolved config dict (as the first
  fold's run wrote it to ``config.yaml``; ``data.fold`` is that fold's number, which a refit on
  all development patients ignores), the searched values, its scores and the selection rule.
* ``aggregate.json``: everything above in one machine-readable file (the report reads it).
* ``oof_best.csv``: ``model, fold, patient_id, y_true, y_score`` — the OOF predictions of the
  best configuration of each modality (feed it to ``breastfusion evaluate`` or the report).
* ``summary.md``: every table, the rule and the warnings on one page.

Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from breastfusion.errors import UserError
from breastfusion.evaluate import metrics as M
from breastfusion.evaluate import stats as S
from breastfusion.io import atomic_dir, atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

LEVEL = 0.95
MIN_BOOTSTRAP = 100
EXPERIMENT_FILE = "experiment.json"
TRIALS_FILE = "trials.csv"
MODALITY_LABELS = {"dm": "DM only", "us": "US only", "fusion": "DM+US"}
MODALITY_ORDER = ("dm", "us", "fusion")

# Parameters of each backbone's feature extractor (no classifier), counted on torchvision
# 0.29 with ``models.registry`` builders. Kept as data so the tie-break below needs no torch;
# heads add at most a few thousand parameters and are ignored. Order = the study's tables.
BACKBONE_PARAMS: dict[str, int] = {
    "resnet18": 11_176_512,
    "resnet50": 23_508_032,
    "resnext50_32x4d": 22_979_904,
    "inception_v3": 21_785_568,
    "vgg16": 14_714_688,
    "googlenet": 5_599_904,
}
BACKBONE_LABELS = {
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
    "resnext50_32x4d": "ResNeXt-50",
    "inception_v3": "Inception v3",
    "vgg16": "VGG16",
    "googlenet": "GoogLeNet",
}


def selection_rule(tie_tolerance: float) -> str:
    """The rule that picks a configuration, in words (written next to every choice)."""
    return (
        "highest mean patient-level validation AUC over the folds, among complete trials "
        f"(every fold finished); trials within {tie_tolerance:g} AUC of the highest count as "
        "tied, and a tie goes to the fewest backbone parameters, then the smallest input "
        "(pixels summed over the branches used), then the lowest fold SD, then the search "
        "and trial name"
    )


METHOD = {
    "unit": "patient (each development patient is scored once, by the fold model that did "
    "not train on it)",
    "mean_auc": "mean ± sample SD (ddof 1) of the per-fold patient-level validation AUCs",
    "pooled_auc": "AUC of the pooled out-of-fold patient scores of all folds; 95% CI by "
    "stratified patient bootstrap (patients resampled within each class), percentile interval",
    "proportions": "sensitivity, specificity, precision, accuracy on the pooled out-of-fold "
    "scores at the threshold (score >= threshold is malignant); 95% Wilson score intervals",
    "comparisons": "paired two-sided DeLong test of equal pooled OOF AUCs on the patients "
    "both configurations scored",
    "caveat": "cross-validation estimates that also chose the configurations: optimistic for "
    "the chosen ones; the holdout evaluation is the unbiased estimate",
}


# --------------------------------------------------------------------------------------------
# Typed results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}


@dataclass(frozen=True)
class PooledMetrics:
    """Metrics of one configuration's pooled out-of-fold patient scores."""

    n_patients: int
    n_malignant: int
    threshold: float
    auc: Interval
    sensitivity: Interval
    specificity: Interval
    precision: Interval
    accuracy: Interval
    confusion: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_patients": self.n_patients,
            "n_malignant": self.n_malignant,
            "threshold": self.threshold,
            "auc": self.auc.as_dict(),
            "sensitivity": self.sensitivity.as_dict(),
            "specificity": self.specificity.as_dict(),
            "precision": self.precision.as_dict(),
            "accuracy": self.accuracy.as_dict(),
            "confusion": dict(self.confusion),
        }


@dataclass(frozen=True)
class TrialResult:
    """One configuration (trial) of one search."""

    search: str  # the search's name (space_name), unique among the given searches
    search_dir: Path
    trial: str
    status: str  # complete | stopped | error
    modality: str  # dm | us | fusion
    backbone: str  # "resnet18", or "resnet18+resnet50" (DM+US) for fusion
    folds: tuple[int, ...]
    fold_aucs: dict[int, float]
    mean_auc: float
    std_auc: float
    searched: dict[str, Any]  # the values the search chose
    config: dict[str, Any]  # the full resolved config (sections → keys)
    config_source: str
    n_params: int | None
    input_pixels: int
    pooled: PooledMetrics | None = None
    oof: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.search}/{self.trial}"

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def summary(self) -> dict[str, Any]:
        """A JSON-safe row (no predictions)."""
        out: dict[str, Any] = {
            "search": self.search,
            "search_dir": str(self.search_dir),
            "trial": self.trial,
            "status": self.status,
            "modality": self.modality,
            "backbone": self.backbone,
            "folds": list(self.folds),
            "fold_aucs": {f"fold{k}": v for k, v in sorted(self.fold_aucs.items())},
            "mean_auc": self.mean_auc,
            "std_auc": self.std_auc,
            "searched": self.searched,
            "n_params": self.n_params,
            "input_pixels": self.input_pixels,
            "config_source": self.config_source,
        }
        out["pooled"] = self.pooled.as_dict() if self.pooled else None
        return out


@dataclass
class AggregateResult:
    """What ``aggregate`` computed and wrote; ``to_dict()`` is ``aggregate.json``."""

    out: Path
    trials: list[TrialResult]
    tables: dict[str, pd.DataFrame]
    best: dict[str, Any]  # best_config.json
    best_by_modality: dict[str, dict[str, Any]]
    comparisons: list[dict[str, Any]]
    searches: list[dict[str, Any]]
    warnings: list[str]
    rule: str
    settings: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "best": self.best,
                "best_by_modality": self.best_by_modality,
                "comparisons": self.comparisons,
                "method": METHOD,
                "rule": self.rule,
                "searches": self.searches,
                "settings": self.settings,
                "tables": {name: df.to_dict(orient="records") for name, df in self.tables.items()},
                "trials": [t.summary() for t in self.trials],
                "warnings": self.warnings,
            }
        )


# --------------------------------------------------------------------------------------------
# Reading a search folder
# --------------------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def _load_fold_config(trial_dir: Path, folds: Sequence[int]) -> dict[str, Any] | None:
    """The resolved config the first finished fold ran with (its ``config.yaml``)."""
    import yaml

    for k in folds:
        path = trial_dir / f"fold{k}" / "config.yaml"
        if path.exists():
            try:
                raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise UserError(f"{path}: cannot read the trial's config ({exc})") from None
            if isinstance(raw, dict):
                raw.pop("config_hash", None)
                return raw
    return None


def _reconstruct_config(fixed: dict[str, Any], searched: dict[str, Any]) -> dict[str, Any]:
    """Defaults + the space's fixed values + the trial's values (no fold config on disk)."""
    from breastfusion.config import Config

    overrides = {k: v for k, v in {**fixed, **searched}.items() if v is not None}
    try:
        return Config().with_overrides(overrides).to_dict()
    except UserError:
        # An old or foreign search: keep what we know rather than refuse the whole table.
        return _nested(overrides)


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    section, _, name = dotted.partition(".")
    block = cfg.get(section)
    return block.get(name, default) if isinstance(block, dict) else default


def _architecture(cfg: dict[str, Any]) -> tuple[str, str, int | None, int]:
    """(modality, backbone label, backbone parameters, input pixels) of a resolved config."""
    modality = str(_get(cfg, "data.modality", "fusion"))
    branches = ("dm", "us") if modality == "fusion" else (modality,)
    names = [str(_get(cfg, f"model.backbone_{b}", "resnet18")) for b in branches]
    params: int | None = 0
    for n in names:
        params = None if params is None or n not in BACKBONE_PARAMS else params + BACKBONE_PARAMS[n]
    pixels = 0
    for b in branches:
        size = _get(cfg, f"data.size_{b}", 224)
        pixels += int(size) ** 2 if isinstance(size, int | float) else 0
    return modality, "+".join(names), params, pixels


def _read_oof(trial_dir: Path, folds: Sequence[int]) -> tuple[pd.DataFrame | None, str]:
    """The trial's OOF predictions: ``oof_predictions.csv``, else its folds' predictions."""
    path = trial_dir / "oof_predictions.csv"
    if path.exists():
        df = pd.read_csv(path, dtype={"patient_id": str})
        return df, str(path)
    parts = []
    for k in folds:
        p = trial_dir / f"fold{k}" / "predictions.csv"
        if p.exists():
            parts.append(pd.read_csv(p, dtype={"patient_id": str}).assign(fold=k))
    if not parts:
        return None, str(path)
    return pd.concat(parts, ignore_index=True), str(trial_dir / "fold*/predictions.csv")


def _pooled_metrics(
    y: np.ndarray, s: np.ndarray, threshold: float, n_boot: int, seed: int
) -> PooledMetrics:
    bm = M.binary_metrics(y, s, threshold)
    boot = S.bootstrap_auc(y, s, n_boot=n_boot, seed=seed)
    lo, hi = S.percentile_ci(boot, LEVEL)

    def prop(value: float, k: int, n: int) -> Interval:
        w_lo, w_hi = S.wilson_interval(k, n, LEVEL)
        return Interval(value, w_lo, w_hi)

    return PooledMetrics(
        n_patients=len(y),
        n_malignant=int(y.sum()),
        threshold=threshold,
        auc=Interval(bm.auc, lo, hi),
        sensitivity=prop(bm.sensitivity, bm.tp, bm.tp + bm.fn),
        specificity=prop(bm.specificity, bm.tn, bm.tn + bm.fp),
        precision=prop(bm.precision, bm.tp, bm.tp + bm.fp),
        accuracy=prop(bm.accuracy, bm.tp + bm.tn, len(y)),
        confusion={"tp": bm.tp, "fp": bm.fp, "tn": bm.tn, "fn": bm.fn},
    )


def read_search(
    search_dir: Path,
    *,
    threshold: float = 0.5,
    n_boot: int = 2000,
    seed: int = 0,
    warnings: list[str] | None = None,
) -> tuple[dict[str, Any], list[TrialResult]]:
    """Read one search folder: (its ``experiment.json`` plus name/path, its trials).

    Complete trials get their pooled OOF metrics; a folder that is not a search, or that holds
    no complete trial, is a ``UserError`` naming the folder.
    """
    warnings = [] if warnings is None else warnings
    search_dir = Path(search_dir)
    if not search_dir.is_dir():
        raise UserError(f"{search_dir}: no such folder (expected a breastfusion search folder)")
    exp_path, trials_path = search_dir / EXPERIMENT_FILE, search_dir / TRIALS_FILE
    if not exp_path.exists():
        raise UserError(
            f"{search_dir} is not a breastfusion search folder (no {EXPERIMENT_FILE}); "
            "pass the --out folder of `breastfusion search`"
        )
    experiment = _read_json(exp_path)
    if not trials_path.exists():
        raise UserError(
            f"{search_dir}: no {TRIALS_FILE} — the search has not finished (resume it with "
            "`breastfusion search --resume`) or crashed before writing its results"
        )
    try:
        table = pd.read_csv(trials_path, dtype={"trial": str, "status": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{trials_path}: cannot read as CSV ({exc})") from None
    missing = [c for c in ("trial", "status", "mean_auc") if c not in table.columns]
    if missing:
        raise UserError(f"{trials_path}: missing column(s) {', '.join(missing)}")
    folds = [int(k) for k in experiment.get("folds") or []]
    if not folds:
        folds = sorted(
            int(c[4:-4]) for c in table.columns if c.startswith("fold") and c.endswith("_auc")
        )
    name = str(experiment.get("space_name") or search_dir.name)
    fixed = dict((experiment.get("space") or {}).get("fixed") or {})
    if experiment.get("debug"):
        warnings.append(
            f"search {name} ({search_dir}) ran with --debug (one fold, tiny data): its "
            "numbers only check the code path"
        )

    complete = table[table["status"] == "complete"]
    if complete.empty:
        counts = table["status"].value_counts().to_dict()
        have = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
        raise UserError(
            f"{search_dir}: no complete trial (every fold finished) to aggregate ({have})"
        )

    trials: list[TrialResult] = []
    for _, row in table.iterrows():
        trial = str(row["trial"])
        searched = {
            c[len("config.") :]: _plain(row[c]) for c in table.columns if c.startswith("config.")
        }
        trial_dir = search_dir / "trials" / trial
        cfg = _load_fold_config(trial_dir, folds)
        source = "fold config.yaml"
        if cfg is None:
            cfg = _reconstruct_config(fixed, searched)
            source = "reconstructed: defaults + the space's fixed values + the trial's values"
        modality, backbone, params, pixels = _architecture(cfg)
        fold_aucs = {
            k: float(row[f"fold{k}_auc"])
            for k in folds
            if f"fold{k}_auc" in table.columns and pd.notna(row[f"fold{k}_auc"])
        }
        status = str(row["status"])
        mean = float(row["mean_auc"]) if pd.notna(row["mean_auc"]) else math.nan
        std = (
            float(row["std_auc"])
            if "std_auc" in table.columns and pd.notna(row["std_auc"])
            else math.nan
        )
        pooled = oof = None
        if status == "complete":
            if math.isnan(mean):
                raise UserError(f"{trials_path}: trial {trial} is complete but has no mean_auc")
            oof, oof_source = _read_oof(trial_dir, folds)
            if oof is None:
                raise UserError(
                    f"{trial_dir}: complete trial {trial} has no oof_predictions.csv and no "
                    "fold<k>/predictions.csv; the search folder is incomplete"
                )
            scores = M.patient_scores(M.validate_predictions(oof, oof_source), oof_source)
            fold_of = oof.assign(patient_id=oof["patient_id"].astype(str)).groupby("patient_id")
            if "fold" in oof.columns:
                scores["fold"] = scores["patient_id"].map(fold_of["fold"].first())
                seen = set(int(f) for f in oof["fold"].dropna().unique())
                if seen != set(folds):
                    warnings.append(
                        f"{oof_source}: out-of-fold predictions cover folds {sorted(seen)}, the "
                        f"search ran folds {folds}"
                    )
            y = scores["y_true"].to_numpy()
            s = scores["y_score"].to_numpy()
            if y.min() == y.max():
                warnings.append(
                    f"{oof_source}: only one class among {len(y)} patients; no pooled AUC"
                )
            else:
                pooled = _pooled_metrics(y, s, threshold, n_boot, seed)
            oof = scores[[c for c in ("fold", "patient_id", "y_true", "y_score") if c in scores]]
        trials.append(
            TrialResult(
                search=name,
                search_dir=search_dir.resolve(),
                trial=trial,
                status=status,
                modality=modality,
                backbone=backbone,
                folds=tuple(folds),
                fold_aucs=fold_aucs,
                mean_auc=mean,
                std_auc=std,
                searched=searched,
                config=cfg,
                config_source=source,
                n_params=params,
                input_pixels=pixels,
                pooled=pooled,
                oof=oof,
            )
        )
    info = {
        "name": name,
        "dir": str(search_dir.resolve()),
        "folds": folds,
        "n_trials": len(table),
        "n_complete": int(len(complete)),
        "fingerprint": experiment.get("fingerprint"),
        "manifest_sha256": experiment.get("manifest_sha256"),
        "splits_sha256": experiment.get("splits_sha256"),
        "trials_sha256": sha256_file(trials_path),
        "debug": bool(experiment.get("debug", False)),
    }
    return info, trials


# --------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------


def choose_best(trials: Sequence[TrialResult], tie_tolerance: float = 0.001) -> TrialResult | None:
    """The best complete trial by ``selection_rule(tie_tolerance)``; None without candidates."""
    candidates = [t for t in trials if t.complete and math.isfinite(t.mean_auc)]
    if not candidates:
        return None
    top = max(t.mean_auc for t in candidates)
    tied = [t for t in candidates if t.mean_auc >= top - tie_tolerance - 1e-12]
    return min(
        tied,
        key=lambda t: (
            t.n_params if t.n_params is not None else math.inf,
            t.input_pixels,
            t.std_auc if math.isfinite(t.std_auc) else math.inf,
            t.search,
            t.trial,
        ),
    )


def _best_record(t: TrialResult, rule: str, what: str) -> dict[str, Any]:
    return {
        "selected_from": what,
        "rule": rule,
        "search": t.search,
        "search_dir": str(t.search_dir),
        "trial": t.trial,
        "modality": t.modality,
        "backbone": t.backbone,
        "score": {
            "metric": "mean patient-level validation AUC over folds",
            "value": t.mean_auc,
            "sd": t.std_auc,
            "fold_aucs": {f"fold{k}": v for k, v in sorted(t.fold_aucs.items())},
        },
        "pooled_oof": t.pooled.as_dict() if t.pooled else None,
        "n_params": t.n_params,
        "input_pixels": t.input_pixels,
        "searched": t.searched,
        "config": t.config,
        "config_source": t.config_source,
    }


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _row(t: TrialResult) -> dict[str, Any]:
    p = t.pooled
    row: dict[str, Any] = {
        "search": t.search,
        "trial": t.trial,
        "modality": t.modality,
        "backbone": t.backbone,
        "n_folds": len(t.fold_aucs),
        "mean_auc": t.mean_auc,
        "std_auc": t.std_auc,
    }
    row.update({f"fold{k}_auc": t.fold_aucs.get(k, math.nan) for k in t.folds})
    for name in ("auc", "sensitivity", "specificity", "precision", "accuracy"):
        iv: Interval | None = getattr(p, name) if p else None
        key = "pooled_auc" if name == "auc" else name
        row[key] = iv.value if iv else math.nan
        row[f"{key}_ci_low"] = iv.ci_low if iv else math.nan
        row[f"{key}_ci_high"] = iv.ci_high if iv else math.nan
    row["threshold"] = p.threshold if p else math.nan
    row["n_patients"] = p.n_patients if p else 0
    row["n_malignant"] = p.n_malignant if p else 0
    return row


def _backbone_order(name: str) -> tuple[int, str]:
    order = list(BACKBONE_PARAMS)
    first = name.split("+")[0]
    return (order.index(first) if first in order else len(order), name)


def backbone_table(
    trials: Sequence[TrialResult], modality: str, tie_tolerance: float = 0.001
) -> pd.DataFrame:
    """Rows = backbone (study order); each the best complete trial with that backbone."""
    rows = []
    mine = [t for t in trials if t.modality == modality and t.complete]
    for backbone in sorted({t.backbone for t in mine}, key=_backbone_order):
        group = [t for t in mine if t.backbone == backbone]
        best = choose_best(group, tie_tolerance)
        if best is None:
            continue
        label = "+".join(BACKBONE_LABELS.get(b, b) for b in backbone.split("+"))
        rows.append({"model": label, **_row(best), "n_trials": len(group)})
    return pd.DataFrame(rows, columns=_columns(trials, first=["model"], last=["n_trials"]))


def _columns(trials: Sequence[TrialResult], first: list[str], last: list[str]) -> list[str]:
    folds = sorted({k for t in trials for k in t.folds})
    base = ["search", "trial", "modality", "backbone", "n_folds", "mean_auc", "std_auc"]
    base += [f"fold{k}_auc" for k in folds]
    for key in ("pooled_auc", "sensitivity", "specificity", "precision", "accuracy"):
        base += [key, f"{key}_ci_low", f"{key}_ci_high"]
    base += ["threshold", "n_patients", "n_malignant"]
    return first + base + last


def modality_table(
    best_by_modality: dict[str, TrialResult], trials: Sequence[TrialResult]
) -> pd.DataFrame:
    rows = [
        {"model": MODALITY_LABELS[m], **_row(t)}
        for m in MODALITY_ORDER
        if (t := best_by_modality.get(m)) is not None
    ]
    return pd.DataFrame(rows, columns=_columns(trials, first=["model"], last=[]))


def trials_table(trials: Sequence[TrialResult]) -> pd.DataFrame:
    rows = []
    for t in sorted(trials, key=lambda t: (t.search, -_finite(t.mean_auc), t.trial)):
        rows.append(
            {**_row(t), "status": t.status, **{f"config.{k}": v for k, v in t.searched.items()}}
        )
    return pd.DataFrame(rows)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def compare_best(best_by_modality: dict[str, TrialResult]) -> list[dict[str, Any]]:
    """Paired DeLong tests between the modalities' best configurations on shared OOF patients."""
    out = []
    present = [m for m in MODALITY_ORDER if m in best_by_modality]
    for a, b in itertools.combinations(present, 2):
        ta, tb = best_by_modality[a], best_by_modality[b]
        if ta.oof is None or tb.oof is None:
            continue
        merged = ta.oof.merge(tb.oof, on="patient_id", suffixes=("_a", "_b"))
        merged = merged[merged["y_true_a"] == merged["y_true_b"]]
        y = merged["y_true_a"].to_numpy()
        record: dict[str, Any] = {
            "a": MODALITY_LABELS[a],
            "b": MODALITY_LABELS[b],
            "trial_a": ta.key,
            "trial_b": tb.key,
            "n_patients": len(merged),
        }
        if len(merged) < 3 or y.min() == y.max():
            record.update(auc_a=math.nan, auc_b=math.nan, difference=math.nan, p_value=math.nan)
        else:
            test = S.delong_test(y, merged["y_score_a"].to_numpy(), merged["y_score_b"].to_numpy())
            record.update(
                auc_a=test.auc_a, auc_b=test.auc_b, difference=test.difference, p_value=test.p_value
            )
        out.append(record)
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _f3(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _pct(v: Any, lo: Any, hi: Any) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{100 * v:.1f} ({100 * lo:.1f}–{100 * hi:.1f})"


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def metrics_markdown(df: pd.DataFrame, title: str, empty: str) -> str:
    """A study-style table: AUC mean ± SD, pooled OOF AUC [CI], proportions in % [Wilson CI]."""
    if df.empty:
        return f"## {title}\n\n{empty}\n"
    header = [
        "model",
        "AUC mean ± SD (folds)",
        "pooled OOF AUC (95% CI)",
        "sensitivity %",
        "specificity %",
        "precision %",
        "accuracy %",
        "patients (malignant)",
        "trial",
    ]
    rows = []
    for r in df.to_dict(orient="records"):
        rows.append(
            [
                r["model"],
                f"{_f3(r['mean_auc'])} ± {_f3(r['std_auc'])}",
                f"{_f3(r['pooled_auc'])} ({_f3(r['pooled_auc_ci_low'])}–"
                f"{_f3(r['pooled_auc_ci_high'])})",
                *(
                    _pct(r[k], r[f"{k}_ci_low"], r[f"{k}_ci_high"])
                    for k in ("sensitivity", "specificity", "precision", "accuracy")
                ),
                f"{r['n_patients']} ({r['n_malignant']})",
                f"{r['search']}/{r['trial']}",
            ]
        )
    thr = df["threshold"].dropna()
    note = (
        f"Proportions at threshold {thr.iloc[0]:g} on the pooled out-of-fold patient scores; "
        "95% CIs: bootstrap (AUC), Wilson (proportions)."
        if len(thr)
        else ""
    )
    return f"## {title}\n\n{markdown_table(header, rows)}\n\n{note}\n"


def comparisons_markdown(comparisons: list[dict[str, Any]]) -> str:
    if not comparisons:
        return "## Paired comparisons (DeLong, OOF)\n\nFewer than two modalities were searched.\n"
    rows = [
        [
            c["a"],
            c["b"],
            c["n_patients"],
            _f3(c["auc_a"]),
            _f3(c["auc_b"]),
            _f3(c["difference"]),
            "n/a" if not math.isfinite(c["p_value"]) else f"{c['p_value']:.3g}",
        ]
        for c in comparisons
    ]
    header = ["a", "b", "shared patients", "AUC a", "AUC b", "difference", "p (DeLong)"]
    return f"## Paired comparisons (DeLong, OOF)\n\n{markdown_table(header, rows)}\n"


def trials_markdown(df: pd.DataFrame) -> str:
    header = [
        "search",
        "trial",
        "status",
        "modality",
        "backbone",
        "AUC mean ± SD",
        "pooled OOF AUC",
    ]
    rows = [
        [
            r["search"],
            r["trial"],
            r["status"],
            r["modality"],
            r["backbone"],
            f"{_f3(r['mean_auc'])} ± {_f3(r['std_auc'])}",
            _f3(r["pooled_auc"]),
        ]
        for r in df.to_dict(orient="records")
    ]
    return f"## All trials\n\n{markdown_table(header, rows)}\n"


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

TABLE_TITLES = {
    "table1_dm_backbones": "Table 1 — DM only, by backbone (cross-validation)",
    "table2_us_backbones": "Table 2 — US only, by backbone (cross-validation)",
    "fusion_backbones": "DM+US fusion, by backbone pair (cross-validation)",
    "table3_modalities": "Table 3 — by modality: best configuration of each (cross-validation)",
}


def aggregate(
    search_dirs: Sequence[Path],
    out: Path,
    *,
    threshold: float = 0.5,
    n_boot: int = 2000,
    seed: int = 0,
    tie_tolerance: float = 0.001,
    best_from: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> AggregateResult:
    """Aggregate search folders into tables and a best configuration; write them to ``out``.

    ``best_from`` restricts the overall choice to one modality (``dm``, ``us``, ``fusion``);
    ``None`` picks across all of them. Raises ``UserError`` for a folder that is not a search,
    a search without complete trials, or bad settings.
    """
    if not search_dirs:
        raise UserError("aggregate needs at least one search folder")
    if not (0 <= threshold <= 1) or math.isnan(threshold):
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    if n_boot < MIN_BOOTSTRAP:
        raise UserError(f"--bootstrap must be at least {MIN_BOOTSTRAP}, got {n_boot}")
    if not (0 <= tie_tolerance < 0.5) or math.isnan(tie_tolerance):
        raise UserError(f"--tie-tolerance must be in [0, 0.5), got {tie_tolerance}")
    if best_from is not None and best_from not in MODALITY_ORDER:
        raise UserError(
            f"--best-from must be one of {', '.join(MODALITY_ORDER)}, got {best_from!r}"
        )
    resolved = [Path(d).resolve() for d in search_dirs]
    dupes = sorted({str(d) for d in resolved if resolved.count(d) > 1})
    if dupes:
        raise UserError(f"search folder given twice: {dupes[0]}")

    warnings: list[str] = []
    searches: list[dict[str, Any]] = []
    trials: list[TrialResult] = []
    for d in search_dirs:
        info, found = read_search(
            Path(d), threshold=threshold, n_boot=n_boot, seed=seed, warnings=warnings
        )
        clash = [s for s in searches if s["name"] == info["name"]]
        if clash:
            raise UserError(
                f"two searches are named {info['name']!r} ({clash[0]['dir']} and {info['dir']}); "
                "trials are keyed by search name — aggregate them separately"
            )
        searches.append(info)
        trials.extend(found)
    for key in ("splits_sha256", "manifest_sha256"):
        values = {s[key] for s in searches if s.get(key)}
        if len(values) > 1:
            what = "splits" if key.startswith("splits") else "manifest"
            warnings.append(
                f"the searches used different {what} files: their cross-validated numbers "
                "(and Table 3's comparisons) are on different patients"
            )
    fold_sets = {tuple(s["folds"]) for s in searches}
    if len(fold_sets) > 1:
        warnings.append(
            f"the searches ran different folds ({sorted(fold_sets)}): their mean AUCs are not "
            "directly comparable"
        )

    rule = selection_rule(tie_tolerance)
    best_by: dict[str, TrialResult] = {}
    for m in MODALITY_ORDER:
        b = choose_best([t for t in trials if t.modality == m], tie_tolerance)
        if b is not None:
            best_by[m] = b
    pool = [t for t in trials if best_from is None or t.modality == best_from]
    best_trial = choose_best(pool, tie_tolerance)
    if best_trial is None:
        raise UserError(
            f"no complete {MODALITY_LABELS[best_from]} trial among the given searches "
            f"(--best-from {best_from})"
        )
    what = (
        "all complete trials of the given searches"
        if best_from is None
        else f"complete {MODALITY_LABELS[best_from]} trials of the given searches"
    )
    best = _best_record(best_trial, rule, what)
    best_by_modality = {
        m: _best_record(t, rule, f"complete {MODALITY_LABELS[m]} trials")
        for m, t in best_by.items()
    }
    comparisons = compare_best(best_by)

    tables = {
        "table1_dm_backbones": backbone_table(trials, "dm", tie_tolerance),
        "table2_us_backbones": backbone_table(trials, "us", tie_tolerance),
        "fusion_backbones": backbone_table(trials, "fusion", tie_tolerance),
        "table3_modalities": modality_table(best_by, trials),
        "table3_comparisons": pd.DataFrame(
            comparisons,
            columns=[
                "a",
                "b",
                "trial_a",
                "trial_b",
                "n_patients",
                "auc_a",
                "auc_b",
                "difference",
                "p_value",
            ],
        ),
        "trials": trials_table(trials),
    }
    settings = {
        "threshold": threshold,
        "bootstrap_resamples": n_boot,
        "seed": seed,
        "tie_tolerance": tie_tolerance,
        "best_from": best_from,
        "confidence_level": LEVEL,
    }
    result = AggregateResult(
        out=Path(out),
        trials=trials,
        tables=tables,
        best=best,
        best_by_modality=best_by_modality,
        comparisons=comparisons,
        searches=searches,
        warnings=warnings,
        rule=rule,
        settings=settings,
    )
    result.files = write_aggregate(result, best_by)
    for w in warnings:
        log.warning(w)
    if echo is not None:
        echo(render_summary(result))
    return result


def _markdowns(result: AggregateResult) -> dict[str, str]:
    t = result.tables
    empty = "No complete trial of this kind among the given searches."
    md = {name: metrics_markdown(t[name], title, empty) for name, title in TABLE_TITLES.items()}
    md["table3_comparisons"] = comparisons_markdown(result.comparisons)
    md["trials"] = trials_markdown(t["trials"])
    return md


def render_summary(result: AggregateResult) -> str:
    """``summary.md``: the best configuration and its rule, every table, the warnings."""
    b = result.best
    lines = [
        "# Aggregated search results",
        "",
        f"Searches: {', '.join(s['name'] for s in result.searches)}.",
        "",
        f"**Best configuration**: {b['search']}/{b['trial']} ({MODALITY_LABELS[b['modality']]}, "
        f"{b['backbone']}), mean fold AUC {_f3(b['score']['value'])} ± {_f3(b['score']['sd'])}.",
        "",
        f"**Rule**: {result.rule}; chosen from {b['selected_from']}.",
        "",
    ]
    md = _markdowns(result)
    for name in ("table3_modalities", "table3_comparisons", *TABLE_TITLES, "trials"):
        if name in md:
            lines.append(md.pop(name))
    lines += ["## Method", ""] + [f"- **{k}**: {v}" for k, v in METHOD.items()]
    if result.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


def write_aggregate(result: AggregateResult, best_by: dict[str, TrialResult]) -> dict[str, Path]:
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    md = _markdowns(result)
    # The whole tables/ folder is replaced so a table no longer produced cannot linger.
    with atomic_dir(out / "tables") as tmp:
        for name, df in result.tables.items():
            (tmp / f"{name}.csv").write_text(df.to_csv(index=False, float_format="%.6g"))
            (tmp / f"{name}.md").write_text(md[name])
    for name in result.tables:
        files[f"tables/{name}.csv"] = out / "tables" / f"{name}.csv"
        files[f"tables/{name}.md"] = out / "tables" / f"{name}.md"
    parts = [
        t.oof.assign(model=MODALITY_LABELS[m])[
            ["model"] + [c for c in ("fold", "patient_id", "y_true", "y_score") if c in t.oof]
        ]
        for m, t in best_by.items()
        if t.oof is not None
    ]
    if parts:
        oof = pd.concat(parts, ignore_index=True)
        files["oof_best.csv"] = atomic_write_text(
            out / "oof_best.csv", oof.to_csv(index=False, float_format="%.6g")
        )
    files["best_config.json"] = atomic_write_json(out / "best_config.json", _clean(result.best))
    files["summary.md"] = atomic_write_text(out / "summary.md", render_summary(result))
    # Written last: its presence means every other output is in place.
    files["aggregate.json"] = atomic_write_json(out / "aggregate.json", result.to_dict())
    return files


def load_aggregate(path: Path) -> dict[str, Any]:
    """Read ``aggregate.json`` (a file, or the ``--out`` folder that holds it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "aggregate.json"
    if not path.exists():
        raise UserError(f"{path}: not found (run `breastfusion aggregate` first)")
    return _read_json(path)


def _clean(obj: Any) -> Any:
    """JSON-safe and byte-stable: NaN/inf → null, numpy → Python, paths → str, 6 decimals."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    return obj


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


@click.command("aggregate")
@click.argument(
    "search_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for tables/, best_config.json, aggregate.json, oof_best.csv, summary.md.",
)
@click.option(
    "--threshold", default=0.5, show_default=True, type=float, help="Threshold for proportions."
)
@click.option("--bootstrap", default=2000, show_default=True, type=int, help="Resamples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
@click.option(
    "--tie-tolerance",
    default=0.001,
    show_default=True,
    type=float,
    help="Mean AUCs this close to the best count as tied (then: fewer parameters wins).",
)
@click.option(
    "--best-from",
    type=click.Choice(["any", *MODALITY_ORDER]),
    default="any",
    show_default=True,
    help="Choose the best configuration among this modality only.",
)
def aggregate_command(
    search_dirs: tuple[Path, ...],
    out: Path,
    threshold: float,
    bootstrap: int,
    seed: int,
    tie_tolerance: float,
    best_from: str,
) -> None:
    """Tables (study Tables 1-3) and the best configuration from SEARCH_DIR folders."""
    result = aggregate(
        list(search_dirs),
        out,
        threshold=threshold,
        n_boot=bootstrap,
        seed=seed,
        tie_tolerance=tie_tolerance,
        best_from=None if best_from == "any" else best_from,
    )
    click.echo(_markdowns(result)["table3_modalities"])
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    b = result.best
    click.echo(
        f"best: {b['search']}/{b['trial']} (mean fold AUC {_f3(b['score']['value'])}); "
        f"rule: {result.rule}"
    )
    click.echo(f"wrote {out / 'best_config.json'}, {out / 'tables'}/, {out / 'aggregate.json'}")
