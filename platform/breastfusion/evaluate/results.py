"""Typed results of the aggregation; ``AggregateResult.to_dict()`` is ``aggregate.json`` and
``AggregateResult.from_dict`` reads it back (the report renders from that, never recomputes).

Floats are kept at full precision; ``None`` stands for "not computed" (NaN in memory).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from breastfusion import runs

if TYPE_CHECKING:
    import pandas as pd


def _f(v: Any) -> float:
    return math.nan if v is None else float(v)


@dataclass(frozen=True)
class Interval:
    value: float
    ci_low: float
    ci_high: float
    se: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}
        if self.se is not None:
            out["se"] = self.se
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Interval:
        d = d or {}
        se = d.get("se")
        return cls(_f(d.get("value")), _f(d.get("ci_low")), _f(d.get("ci_high")), se)

    @classmethod
    def nan(cls) -> Interval:
        return cls(math.nan, math.nan, math.nan)


PROPORTIONS = ("sensitivity", "specificity", "precision", "accuracy")


@dataclass(frozen=True)
class CvSummary:
    """One configuration's cross-validated patient-level numbers (its pooled OOF scores).

    ``stratified_auc`` (headline): concordance counted within folds, stratified DeLong CI
    (conditional on the fold models). ``pooled_auc`` (secondary): AUC of the pooled
    calibrated OOF scores, stratified patient bootstrap CI. Proportions at ``threshold`` on
    the pooled calibrated OOF scores with Wilson CIs.
    """

    n_patients: int
    n_malignant: int
    n_folds: int  # folds with both classes (strata of the stratified AUC)
    stratified_auc: Interval
    pooled_auc: Interval
    threshold: float
    threshold_probability: float
    threshold_source: str
    score_scale: str
    sensitivity: Interval
    specificity: Interval
    precision: Interval
    accuracy: Interval
    confusion: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("n_patients", "n_malignant", "n_folds", "threshold")
            + ("threshold_probability", "threshold_source", "score_scale")
        }
        for k in ("stratified_auc", "pooled_auc", *PROPORTIONS):
            out[k] = getattr(self, k).to_dict()
        out["confusion"] = dict(self.confusion)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CvSummary:
        ivs = {k: Interval.from_dict(d.get(k)) for k in ("stratified_auc", "pooled_auc")}
        ivs.update({k: Interval.from_dict(d.get(k)) for k in PROPORTIONS})
        return cls(
            n_patients=int(d.get("n_patients") or 0),
            n_malignant=int(d.get("n_malignant") or 0),
            n_folds=int(d.get("n_folds") or 0),
            threshold=_f(d.get("threshold")),
            threshold_probability=_f(d.get("threshold_probability")),
            threshold_source=str(d.get("threshold_source") or ""),
            score_scale=str(d.get("score_scale") or ""),
            confusion={k: int(v) for k, v in (d.get("confusion") or {}).items()},
            **ivs,
        )


@dataclass(frozen=True)
class TrialResult:
    """One configuration (trial) of one search."""

    search: str  # the search's name, unique among the aggregated searches
    search_dir: str
    trial: str
    status: str  # complete | stopped | error (as trials.csv says)
    modality: str  # dm | us | fusion
    backbone: str  # "resnet18", or "resnet18+resnet50" (DM+US)
    backbone_label: str  # "ResNet-18", "ResNet-18+ResNet-50"
    folds: tuple[int, ...]
    fold_aucs: dict[int, float]
    mean_auc: float  # the search objective: mean of the fold AUCs (trials.csv)
    std_auc: float
    searched: dict[str, Any]
    config: dict[str, Any]
    config_source: str
    n_params: int | None
    input_pixels: int
    degenerate: str | None = None  # why its fold models are degenerate; None: they are not
    degenerate_folds: tuple[int, ...] = ()
    cv: CvSummary | None = None
    oof: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.search}/{self.trial}"

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def candidate(self) -> runs.Candidate:
        """What ``runs.choose_best`` ranks (the one best rule)."""
        return runs.Candidate(
            search=self.search,
            trial=self.trial,
            complete=self.complete,
            degenerate=self.degenerate is not None,
            score=self.mean_auc,
            sd=self.std_auc,
            n_params=self.n_params,
            input_pixels=self.input_pixels,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _TRIAL_PLAIN}
        out["folds"] = list(self.folds)
        out["fold_aucs"] = {f"fold{k}": v for k, v in sorted(self.fold_aucs.items())}
        out["degenerate_folds"] = list(self.degenerate_folds)
        out["cv"] = self.cv.to_dict() if self.cv else None
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialResult:
        plain = {k: d.get(k) for k in _TRIAL_PLAIN}
        plain["mean_auc"], plain["std_auc"] = _f(d.get("mean_auc")), _f(d.get("std_auc"))
        plain["input_pixels"] = int(d.get("input_pixels") or 0)
        return cls(
            **plain,
            folds=tuple(int(k) for k in d.get("folds") or ()),
            fold_aucs={int(k[4:]): _f(v) for k, v in (d.get("fold_aucs") or {}).items()},
            degenerate_folds=tuple(int(k) for k in d.get("degenerate_folds") or ()),
            cv=CvSummary.from_dict(d["cv"]) if d.get("cv") else None,
        )


_TRIAL_PLAIN = (
    "search",
    "search_dir",
    "trial",
    "status",
    "modality",
    "backbone",
    "backbone_label",
    "mean_auc",
    "std_auc",
    "searched",
    "config",
    "config_source",
    "n_params",
    "input_pixels",
    "degenerate",
)


@dataclass(frozen=True)
class Comparison:
    """Stratified paired DeLong test of two configurations' fold-stratified AUCs."""

    a: str
    b: str
    trial_a: str
    trial_b: str
    n_patients: int  # patients both scored, in the same fold
    n_folds: int
    auc_a: float
    auc_b: float
    difference: float
    se: float
    z: float
    p_value: float
    method: str = "stratified paired DeLong (folds as strata)"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparison:
        nums = ("auc_a", "auc_b", "difference", "se", "z", "p_value")
        return cls(
            **{k: str(d.get(k) or "") for k in ("a", "b", "trial_a", "trial_b", "method", "note")},
            n_patients=int(d.get("n_patients") or 0),
            n_folds=int(d.get("n_folds") or 0),
            **{k: _f(d.get(k)) for k in nums},
        )


@dataclass(frozen=True)
class TableRow:
    """A row of a CV table: its label and the configuration it shows."""

    label: str
    trial: str  # TrialResult.key
    n_trials: int = 1  # configurations of that kind that were tried

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "trial": self.trial, "n_trials": self.n_trials}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TableRow:
        return cls(str(d["label"]), str(d["trial"]), int(d.get("n_trials") or 1))


TABLES = ("table1_dm_backbones", "table2_us_backbones", "fusion_backbones", "table3_modalities")


@dataclass
class AggregateResult:
    """What ``aggregate`` computed. Tables list trial keys; numbers live in the trials."""

    searches: list[dict[str, Any]]
    trials: list[TrialResult]
    tables: dict[str, list[TableRow]]
    best: dict[str, Any]  # best_config.json
    best_by_modality: dict[str, dict[str, Any]]
    comparisons: list[Comparison]
    warnings: list[str]
    rule: str
    settings: dict[str, Any]
    method: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # name → path relative to the out dir

    def trial(self, key: str) -> TrialResult:
        for t in self.trials:
            if t.key == key:
                return t
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_by_modality": self.best_by_modality,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "files": dict(self.files),
            "method": self.method,
            "rule": self.rule,
            "searches": self.searches,
            "settings": self.settings,
            "tables": {n: [r.to_dict() for r in rows] for n, rows in self.tables.items()},
            "trials": [t.to_dict() for t in self.trials],
            "warnings": self.warnings,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AggregateResult:
        return cls(
            searches=list(d.get("searches") or []),
            trials=[TrialResult.from_dict(t) for t in d.get("trials") or []],
            tables={
                n: [TableRow.from_dict(r) for r in rows]
                for n, rows in (d.get("tables") or {}).items()
            },
            best=dict(d.get("best") or {}),
            best_by_modality=dict(d.get("best_by_modality") or {}),
            comparisons=[Comparison.from_dict(c) for c in d.get("comparisons") or []],
            warnings=[str(w) for w in d.get("warnings") or []],
            rule=str(d.get("rule") or ""),
            settings=dict(d.get("settings") or {}),
            method=dict(d.get("method") or {}),
            files=dict(d.get("files") or {}),
        )
