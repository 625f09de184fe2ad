"""Search folders → per-configuration CV results, the study's Tables 1–3, the best configuration.

``aggregate(search_dirs, out)`` reads every search (``evaluate.searches``), summarises each
complete trial (``evaluate.cv``: mean fold AUC ± SD, the fold-stratified AUC with a
stratified DeLong CI as the headline, the pooled calibrated OOF AUC as a labelled secondary
figure, proportions at the operating threshold), picks the best configuration with THE
best rule (``runs.choose_best``: degenerate or incomplete trials are never chosen), compares
the modalities' best configurations with the stratified paired DeLong test, and returns a
typed ``AggregateResult``. With ``out`` it also writes (atomically):

* ``tables/<table>.csv``: ``table1_dm_backbones``, ``table2_us_backbones``,
  ``fusion_backbones``, ``table3_modalities``, ``table3_comparisons``, ``trials``;
* ``oof_best.csv``: ``model, fold, patient_id, y_true, y_score`` of each modality's best;
* ``best_config.json``: the chosen configuration (full resolved config, scores, the rule);
* ``aggregate.json``: the whole result (``AggregateResult.to_dict()``; read it back with
  ``load_aggregate``).

Markdown and HTML renderings are the report's (``breastfusion.report.cv``). Nothing here
imports torch.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from breastfusion import runs
from breastfusion.errors import UserError
from breastfusion.evaluate import cv
from breastfusion.evaluate.results import PROPORTIONS, AggregateResult, TableRow, TrialResult
from breastfusion.evaluate.searches import read_search
from breastfusion.evaluate.settings import AggregateSettings
from breastfusion.io import atomic_dir, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = 2  # aggregate.json layout version (tables as trial keys, typed trials)
AGGREGATE_FILE = "aggregate.json"
BEST_CONFIG_FILE = "best_config.json"
OOF_BEST_FILE = "oof_best.csv"
TABLES_DIR = "tables"
MODALITY_ORDER = runs.MODALITY_ORDER
MODALITY_LABELS = runs.MODALITY_LABELS


def aggregate(
    search_dirs: Sequence[Path],
    out: Path | None = None,
    *,
    threshold: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    tie_tolerance: float = runs.DEFAULT_TIE_TOLERANCE,
    best_from: str | None = None,
    score_scale: str = "auto",
    prefix: str = "aggregate",
    names: Mapping[str, str] | None = None,
) -> AggregateResult:
    """Aggregate search folders (see the module doc); write the files when ``out`` is given.

    Settings errors name ``prefix.key`` (or ``names[key]``). Raises ``UserError`` for a
    folder that is not a search, a search without complete trials, or no eligible trial.
    """
    settings = AggregateSettings.from_dict(
        {
            "threshold": threshold,
            "bootstrap": n_boot,
            "seed": seed,
            "tie_tolerance": tie_tolerance,
            "best_from": best_from,
            "score_scale": score_scale,
        },
        prefix,
        names=names,
    )
    searches, trials, warnings = _read_all(search_dirs, settings)
    rule = runs.selection_rule(settings.tie_tolerance)
    best_by = {
        m: t
        for m in MODALITY_ORDER
        if (t := _choose([x for x in trials if x.modality == m], settings)) is not None
    }
    best = _overall_best(trials, settings, names, prefix)
    what = (
        "all complete, non-degenerate trials of the given searches"
        if settings.best_from is None
        else f"complete, non-degenerate {MODALITY_LABELS[settings.best_from]} trials"
    )
    result = AggregateResult(
        searches=searches,
        trials=trials,
        tables=_tables(trials, settings),
        best=best_record(best, rule, what),
        best_by_modality={
            m: best_record(t, rule, f"complete, non-degenerate {MODALITY_LABELS[m]} trials")
            for m, t in best_by.items()
        },
        comparisons=_compare(best_by),
        warnings=warnings,
        rule=rule,
        settings={**settings.to_dict(), "confidence_level": cv.LEVEL},
        method=cv.method_text([t.cv.score_scale for t in trials if t.cv]),
    )
    for w in warnings:
        log.warning(w)
    if out is not None:
        write_aggregate(result, Path(out))
    return result


def _compare(best_by: Mapping[str, TrialResult]) -> list:
    """Stratified paired DeLong tests between the modalities' best configurations."""
    present = [m for m in MODALITY_ORDER if m in best_by]
    return [
        c
        for a, b in itertools.combinations(present, 2)
        if (c := cv.compare(MODALITY_LABELS[a], best_by[a], MODALITY_LABELS[b], best_by[b]))
    ]


def _read_all(
    search_dirs: Sequence[Path], settings: AggregateSettings
) -> tuple[list[dict[str, Any]], list[TrialResult], list[str]]:
    if not search_dirs:
        raise UserError("aggregate needs at least one search folder")
    resolved = [Path(d).resolve() for d in search_dirs]
    dupes = sorted({str(d) for d in resolved if resolved.count(d) > 1})
    if dupes:
        raise UserError(f"search folder given twice: {dupes[0]}")
    warnings: list[str] = []
    searches: list[dict[str, Any]] = []
    trials: list[TrialResult] = []
    for d in search_dirs:
        info, found = read_search(Path(d), settings, warnings)
        clash = [s for s in searches if s["name"] == info["name"]]
        if clash:
            raise UserError(
                f"two searches are named {info['name']!r} ({clash[0]['dir']} and {info['dir']}); "
                "trials are keyed by search name — aggregate them separately"
            )
        searches.append(info)
        trials.extend(found)
    for key, what in (("splits_sha256", "splits"), ("manifest_sha256", "manifest")):
        if len({s[key] for s in searches if s.get(key)}) > 1:
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
    return searches, trials, warnings


def _choose(trials: Sequence[TrialResult], settings: AggregateSettings) -> TrialResult | None:
    """``runs.choose_best`` over these trials (the one best rule)."""
    by_key = {(t.search, t.trial): t for t in trials}
    chosen = runs.choose_best([t.candidate() for t in trials], settings.tie_tolerance)
    return None if chosen is None else by_key[(chosen.search, chosen.trial)]


def _overall_best(
    trials: Sequence[TrialResult],
    settings: AggregateSettings,
    names: Mapping[str, str] | None,
    prefix: str,
) -> TrialResult:
    pool = [t for t in trials if settings.best_from is None or t.modality == settings.best_from]
    best = _choose(pool, settings)
    if best is not None:
        return best
    kind = "" if settings.best_from is None else f"{MODALITY_LABELS[settings.best_from]} "
    key = (names or {}).get("best_from") or f"{prefix}.best_from"
    degenerate = [t for t in pool if t.complete and t.degenerate is not None]
    why = (
        f"; {len(degenerate)} complete trial(s) are degenerate (e.g. {degenerate[0].key}: "
        f"{degenerate[0].degenerate})"
        if degenerate
        else ""
    )
    where = f" ({key} {settings.best_from})" if settings.best_from else ""
    raise UserError(f"no eligible {kind}trial among the given searches{where}{why}")


def _shown(group: Sequence[TrialResult], settings: AggregateSettings) -> TrialResult | None:
    """The trial a table row shows: the best eligible one, else (all degenerate) the
    degenerate one with the highest mean AUC, shown as degenerate."""
    best = _choose(group, settings)
    if best is not None:
        return best
    complete = [t for t in group if t.complete]
    return max(complete, key=lambda t: (t.mean_auc, t.key), default=None)


def _backbone_order(name: str) -> tuple[int, str]:
    from breastfusion.models.registry import backbone_names

    order = backbone_names()
    first = name.split("+")[0]
    return (order.index(first) if first in order else len(order), name)


def _tables(trials: Sequence[TrialResult], settings: AggregateSettings) -> dict[str, list]:
    tables: dict[str, list[TableRow]] = {}
    for name, modality in (
        ("table1_dm_backbones", "dm"),
        ("table2_us_backbones", "us"),
        ("fusion_backbones", "fusion"),
    ):
        mine = [t for t in trials if t.modality == modality and t.complete]
        rows = []
        for backbone in sorted({t.backbone for t in mine}, key=_backbone_order):
            group = [t for t in mine if t.backbone == backbone]
            shown = _shown(group, settings)
            if shown is not None:
                rows.append(TableRow(shown.backbone_label, shown.key, len(group)))
        tables[name] = rows
    tables["table3_modalities"] = [
        TableRow(MODALITY_LABELS[m], shown.key, sum(t.modality == m for t in trials))
        for m in MODALITY_ORDER
        if (shown := _shown([t for t in trials if t.modality == m], settings)) is not None
    ]
    return tables


def best_record(t: TrialResult, rule: str, what: str) -> dict[str, Any]:
    """``best_config.json``: the chosen trial, its full resolved config, scores and rule."""
    return {
        "selected_from": what,
        "rule": rule,
        "search": t.search,
        "search_dir": t.search_dir,
        "trial": t.trial,
        "modality": t.modality,
        "backbone": t.backbone,
        "backbone_label": t.backbone_label,
        "score": {
            "metric": "mean patient-level validation AUC over folds",
            "value": t.mean_auc,
            "sd": t.std_auc,
            "fold_aucs": {f"fold{k}": v for k, v in sorted(t.fold_aucs.items())},
        },
        "cv": t.cv.to_dict() if t.cv else None,
        "n_params": t.n_params,
        "input_pixels": t.input_pixels,
        "searched": t.searched,
        "config": t.config,
        "config_source": t.config_source,
    }


# --------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------


def trial_row(t: TrialResult) -> dict[str, Any]:
    """One flat CSV row of a trial (every number at full precision)."""
    row: dict[str, Any] = {
        "search": t.search,
        "trial": t.trial,
        "status": t.status,
        "modality": t.modality,
        "backbone": t.backbone,
        "n_folds": len(t.fold_aucs),
        "mean_auc": t.mean_auc,
        "std_auc": t.std_auc,
        **{f"fold{k}_auc": t.fold_aucs.get(k) for k in t.folds},
        "degenerate": t.degenerate is not None,
        "degenerate_reason": t.degenerate,
    }
    c = t.cv
    for key in ("stratified_auc", "pooled_auc", *PROPORTIONS):
        iv = getattr(c, key) if c else None
        row[key] = iv.value if iv else None
        row[f"{key}_ci_low"] = iv.ci_low if iv else None
        row[f"{key}_ci_high"] = iv.ci_high if iv else None
    row["stratified_auc_se"] = c.stratified_auc.se if c else None
    for key in ("threshold", "threshold_probability", "score_scale", "n_patients", "n_malignant"):
        row[key] = getattr(c, key) if c else None
    return row


def table_frame(result: AggregateResult, name: str) -> pd.DataFrame:
    """A CV table as a DataFrame; a degenerate row's results are left empty."""
    rows = []
    for r in result.tables.get(name, []):
        row = {"model": r.label, **trial_row(result.trial(r.trial)), "n_trials": r.n_trials}
        if row["degenerate"]:
            for k in list(row):
                if k.endswith(("_auc", "_ci_low", "_ci_high", "_se")) or k in PROPORTIONS:
                    row[k] = None
        rows.append(row)
    return pd.DataFrame(rows)


def write_aggregate(result: AggregateResult, out: Path) -> dict[str, Path]:
    """Write the JSON/CSV outputs listed in the module doc; record them in ``result.files``."""
    out.mkdir(parents=True, exist_ok=True)
    frames = {name: table_frame(result, name) for name in result.tables}
    frames["table3_comparisons"] = pd.DataFrame([c.to_dict() for c in result.comparisons])
    frames["trials"] = pd.DataFrame([trial_row(t) for t in result.trials])
    # The whole tables/ folder is replaced so a table no longer produced cannot linger.
    with atomic_dir(out / TABLES_DIR) as tmp:
        for name, df in frames.items():
            (tmp / f"{name}.csv").write_text(runs.csv_text(df), encoding="utf-8")
    files = {f"{TABLES_DIR}/{n}.csv": out / TABLES_DIR / f"{n}.csv" for n in frames}
    best = {
        m: result.trial(f"{b['search']}/{b['trial']}") for m, b in result.best_by_modality.items()
    }
    parts = [
        t.oof.assign(model=MODALITY_LABELS[m])[["model", "fold", "patient_id", "y_true", "y_score"]]
        for m, t in best.items()
        if t.oof is not None
    ]
    if parts:
        oof = runs.csv_text(pd.concat(parts, ignore_index=True))
        files[OOF_BEST_FILE] = atomic_write_text(out / OOF_BEST_FILE, oof)
    # Folder paths are stored relative to ``out``: a moved study or results folder still reads.
    files[BEST_CONFIG_FILE] = atomic_write_json(
        out / BEST_CONFIG_FILE, runs.portable(result.best, out)
    )
    result.files = {k: str(Path(k)) for k in [*files, AGGREGATE_FILE]}
    files[AGGREGATE_FILE] = atomic_write_json(
        out / AGGREGATE_FILE, runs.portable({"format": FORMAT, **result.to_dict()}, out)
    )
    return files


def load_aggregate(path: Path) -> AggregateResult:
    """Read ``aggregate.json`` (a file, or the folder that holds it) back as a typed result."""
    path = Path(path)
    if path.is_dir():
        path = path / AGGREGATE_FILE
    data = runs.read_json(path, "aggregation result")
    if data.get("format") != FORMAT:
        raise UserError(
            f"{path}: written by an older breastfusion (format {data.get('format', 1)}, "
            f"expected {FORMAT}); run `breastfusion aggregate` on the searches again"
        )
    return AggregateResult.from_dict(runs.resolved(data, path.parent))
