"""Read a search folder (through ``breastfusion.runs``) into typed per-trial results.

Files are named and read only by ``runs.SearchDir`` / ``TrialDir`` / ``FoldDir``; the facts
the best rule needs come from ``runs.candidate`` / ``runs.architecture``. A trial is
degenerate when ``trials.csv`` says so (``degenerate`` / ``degenerate_folds``) or a fold's
``metrics.json`` has ``degenerate: true``; a ``trials.csv`` from before that column existed
means "not degenerate".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from breastfusion import runs
from breastfusion.errors import UserError
from breastfusion.evaluate.cv import cv_summary, patient_oof
from breastfusion.evaluate.results import TrialResult
from breastfusion.evaluate.settings import AggregateSettings
from breastfusion.io import sha256_file


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _num(v: Any) -> float:
    try:
        out = float(v)
    except (TypeError, ValueError):
        return math.nan
    return out


def read_search(
    search_dir: Path, settings: AggregateSettings, warnings: list[str]
) -> tuple[dict[str, Any], list[TrialResult]]:
    """(what the search was, its trials). Complete trials get their CV summary; a folder that
    is not a search, or holds no complete trial, is a ``UserError`` naming the folder."""
    sd = runs.SearchDir(Path(search_dir))
    experiment = sd.experiment()
    table = sd.trials_table()
    folds = [int(k) for k in experiment.get("folds") or []]
    if not folds:
        folds = sorted(
            int(c[4:-4]) for c in table.columns if c.startswith("fold") and c.endswith("_auc")
        )
    name = str(experiment.get("space_name") or sd.path.name)
    fixed = dict((experiment.get("space") or {}).get("fixed") or {})
    if experiment.get("debug"):
        warnings.append(
            f"search {name} ({sd.path}) ran with --debug (one fold, tiny data): its numbers "
            "only check the code path"
        )
    if not (table["status"] == "complete").any():
        counts = table["status"].value_counts().to_dict()
        have = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
        raise UserError(f"{sd.path}: no complete trial (every fold finished) to aggregate ({have})")
    trials = [
        read_trial(sd, name, row, folds, fixed, settings, warnings)
        for row in table.to_dict(orient="records")
    ]
    info = {
        "name": name,
        "dir": str(sd.path.resolve()),
        "folds": folds,
        "n_trials": len(table),
        "n_complete": int((table["status"] == "complete").sum()),
        "n_degenerate": sum(t.degenerate is not None for t in trials),
        "fingerprint": experiment.get("fingerprint"),
        "manifest_sha256": experiment.get("manifest_sha256"),
        "splits_sha256": experiment.get("splits_sha256"),
        "trials_sha256": sha256_file(sd.trials_path),
        "debug": bool(experiment.get("debug", False)),
    }
    return info, trials


def read_trial(
    sd: runs.SearchDir,
    search: str,
    row: Mapping[str, Any],
    folds: Sequence[int],
    fixed: Mapping[str, Any],
    settings: AggregateSettings,
    warnings: list[str],
) -> TrialResult:
    """One ``trials.csv`` row and its folders → ``TrialResult``."""
    from breastfusion.models.registry import backbone_label

    trial = str(row["trial"])
    searched = {k[len("config.") :]: _plain(v) for k, v in row.items() if k.startswith("config.")}
    td = sd.trial(trial)
    cfg, source = td.config(folds), "fold config.yaml"
    if cfg is None:
        cfg = _reconstruct_config(fixed, searched)
        source = "reconstructed: defaults + the space's fixed values + the trial's values"
    cand, arch = runs.candidate(search, row, cfg), runs.architecture(cfg)
    fold_metrics = {f.k: f.metrics() for f in td.folds(folds) if f.finished}
    reason, bad_folds = degenerate(row, fold_metrics, sd.trials_path)
    cv = oof = None
    if cand.complete:
        if not math.isfinite(cand.score):
            raise UserError(f"{sd.trials_path}: trial {trial} is complete but has no mean_auc")
        oof = _oof(td, folds, trial, warnings)
        thresholds = [m.get("threshold") for m in fold_metrics.values()]
        cv = cv_summary(oof, thresholds, settings, warnings, f"{td.path} (out-of-fold)")
    fold_aucs = {k: _num(row.get(f"fold{k}_auc")) for k in folds}
    return TrialResult(
        search=search,
        search_dir=str(sd.path.resolve()),
        trial=trial,
        status=str(row["status"]),
        modality=arch.modality,
        backbone=arch.backbone,
        backbone_label="+".join(backbone_label(b) for b in arch.backbone.split("+")),
        folds=tuple(folds),
        fold_aucs={k: v for k, v in fold_aucs.items() if math.isfinite(v)},
        mean_auc=cand.score,
        std_auc=cand.sd,
        searched=searched,
        config=cfg,
        config_source=source,
        n_params=arch.n_params,
        input_pixels=arch.input_pixels,
        degenerate=reason,
        degenerate_folds=bad_folds,
        cv=cv,
        oof=oof,
    )


def _truthy(v: Any) -> bool:
    v = _plain(v)
    return bool(v) and str(v).strip().lower() not in ("false", "0", "nan", "none", "")


def _fold_list(v: Any) -> tuple[int, ...]:
    v = _plain(v)
    if v is None or isinstance(v, bool):
        return ()
    if isinstance(v, int | float):
        return (int(v),) if math.isfinite(v) else ()
    return tuple(int(x) for x in re.findall(r"\d+", str(v)))


def degenerate(
    row: Mapping[str, Any], fold_metrics: Mapping[int, Mapping[str, Any]], trials_path: Path
) -> tuple[str | None, tuple[int, ...]]:
    """(why the trial is degenerate or None, its degenerate folds)."""
    reasons = {
        k: str(m.get("degenerate_reason") or "degenerate scores")
        for k, m in sorted(fold_metrics.items())
        if m.get("degenerate") is True
    }
    listed = _fold_list(row.get("degenerate_folds"))
    folds = tuple(sorted(set(reasons) | set(listed)))
    if reasons:
        return "; ".join(f"fold {k}: {r}" for k, r in reasons.items()), folds
    if listed:
        return f"fold(s) {', '.join(map(str, listed))} degenerate ({trials_path.name})", folds
    if _truthy(row.get("degenerate")):
        return f"marked degenerate in {trials_path.name}", folds
    return None, ()


def _oof(td: runs.TrialDir, folds: Sequence[int], trial: str, warnings: list[str]) -> Any:
    parts = [
        (f.k, f.predictions(), str(f.path / runs.FOLD_PREDICTIONS))
        for f in td.folds(folds)
        if (f.path / runs.FOLD_PREDICTIONS).is_file()
    ]
    if not parts:
        raise UserError(
            f"{td.path}: complete trial {trial} has no fold predictions "
            f"(fold<k>/{runs.FOLD_PREDICTIONS}); the search folder is incomplete"
        )
    seen = sorted(k for k, _, _ in parts)
    if seen != sorted(folds):
        warnings.append(
            f"{td.path}: out-of-fold predictions cover folds {seen}, the search ran {list(folds)}"
        )
    return patient_oof(parts)


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def _reconstruct_config(fixed: Mapping[str, Any], searched: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults + the space's fixed values + the trial's values (no fold config on disk)."""
    from breastfusion.config import Config

    overrides = {k: v for k, v in {**fixed, **searched}.items() if v is not None}
    try:
        return Config().with_overrides(overrides).to_dict()
    except UserError:
        # An old or foreign search: keep what we know rather than refuse the whole table.
        return _nested(overrides)
