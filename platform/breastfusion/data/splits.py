"""Patient-level splits: one holdout test cohort plus K stratified folds, persisted once.

Every image of a patient lives in exactly one place (holdout, or the validation part of one
fold), so no patient's images ever leak between training and evaluation. The splits are made
once, written as byte-stable JSON next to the manifest's hash, and only read downstream;
``load_splits`` re-checks them against the manifest on every read, because a splits file that
silently disagrees with its manifest is the classic way leakage creeps into a study.

Why the stratification is done on patients (one row each) and not on images: the patient is
the evaluation unit, and a patient with many images must not weigh more in the class balance
of a fold than a patient with one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.data.splits_file import (  # noqa: F401 (re-exported: one splits API)
    Fold,
    Splits,
    check_splits,
    load_splits,
    name_list,
)
from breastfusion.errors import SplitError
from breastfusion.io import atomic_write_json

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Making splits
# --------------------------------------------------------------------------------------------


def patient_labels(df: pd.DataFrame) -> pd.Series:
    """One label (0/1) per patient, indexed by patient id (str), sorted by id.

    The manifest loader already refuses conflicting labels; this re-checks because splits
    may be made from any DataFrame (tests, derived manifests).
    """
    missing = [c for c in ("patient_id", "y") if c not in df.columns]
    if missing:
        raise SplitError(f"cannot make splits: the manifest table lacks column(s) {missing}")
    if df.empty:
        raise SplitError("cannot make splits: the manifest has no rows")
    ids = df["patient_id"].astype(str)
    y = pd.to_numeric(df["y"], errors="coerce")
    if y.isna().any() or not y.isin([0, 1]).all():
        raise SplitError("cannot make splits: column 'y' must hold 0 (benign) or 1 (malignant)")
    per_patient = pd.DataFrame({"patient_id": ids, "y": y.astype(int)})
    n_labels = per_patient.groupby("patient_id")["y"].nunique()
    conflicting = sorted(n_labels.index[n_labels > 1])
    if conflicting:
        raise SplitError(
            "cannot make splits: patient(s) with both labels: " + name_list(conflicting)
        )
    labels = per_patient.groupby("patient_id")["y"].first()
    return labels.sort_index()


def subsample_patients(ids: Sequence[str], labels: pd.Series, n: int, seed: int) -> list[str]:
    """At most ``n`` of ``ids``, drawn per class in proportion, in their original order.

    ``labels`` maps patient id -> 0/1 (a Series indexed by id). Each class present in
    ``ids`` keeps at least one patient; the draw is seeded (``numpy.random.default_rng``),
    so the same inputs give the same subset on every machine. Used to cap the patients of a
    quick run (``data.max_patients``).
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise SplitError(f"data.max_patients must be a positive integer (got {n!r})")
    if len(ids) <= n:
        return list(ids)
    missing = [pid for pid in ids if pid not in labels.index]
    if missing:
        raise SplitError(f"no label for patient(s) {name_list([str(m) for m in missing])}")
    rng = np.random.default_rng(seed)
    y = labels.loc[list(ids)].to_numpy()
    ids_arr = np.asarray(ids)
    pos, neg = ids_arr[y == 1], ids_arr[y == 0]
    # Rounded share of the malignant class, at least one if any: a tiny run still sees both.
    n_pos = min(len(pos), max(1 if len(pos) else 0, round(n * len(pos) / len(ids))))
    n_neg = min(len(neg), n - n_pos)
    keep = set(rng.choice(pos, n_pos, replace=False)) | set(rng.choice(neg, n_neg, replace=False))
    return [p for p in ids if p in keep]


def _class_name(y: int) -> str:
    return "malignant" if y == 1 else "benign"


def _holdout_counts(n_per_class: dict[int, int], fraction: float) -> dict[int, int]:
    """Patients per class in the holdout: round(fraction * N) in total, split by largest
    remainder so the holdout's class ratio matches the cohort's as closely as integers allow."""
    n = sum(n_per_class.values())
    total = math.floor(fraction * n + 0.5)
    exact = {c: total * k / n for c, k in n_per_class.items()}
    counts = {c: math.floor(v) for c, v in exact.items()}
    # Ties broken by class (benign first) so the result never depends on dict order.
    order = sorted(exact, key=lambda c: (-(exact[c] - counts[c]), c))
    for c in order[: total - sum(counts.values())]:
        counts[c] += 1
    return counts


def make_splits(
    df: pd.DataFrame,
    folds: int = 5,
    holdout: float = 0.2,
    seed: int = 0,
    manifest_sha256: str = "",
) -> dict[str, Any]:
    """Split the manifest's patients into a stratified holdout and K stratified folds.

    ``df`` needs ``patient_id`` and ``y`` (one label per patient; several rows per patient are
    fine). ``holdout=0`` means no holdout cohort (all patients are development patients).
    Returns the JSON-ready dict that ``write_splits`` persists; the same inputs give the same
    dict (and bytes) on every machine. Errors name the study keys ``splits.folds``,
    ``splits.holdout`` and ``splits.seed``.
    """
    folds, holdout, seed = _check_settings(folds, holdout, seed)
    labels = patient_labels(df)
    ids = np.asarray(labels.index, dtype=object)
    y = labels.to_numpy()
    n_per_class = {c: int((y == c).sum()) for c in (0, 1)}
    counts = _holdout_counts(n_per_class, holdout) if holdout > 0 else {0: 0, 1: 0}
    # Folds first: when both fail, a larger holdout (the holdout's advice) would make the
    # fold problem worse.
    _check_fold_counts(n_per_class, counts, folds, holdout)
    _check_holdout_counts(n_per_class, counts, folds, holdout)

    holdout_ids = _choose_holdout(ids, y, counts, seed)
    holdout_set = set(holdout_ids)
    dev_mask = np.array([pid not in holdout_set for pid in ids])
    fold_list = _make_folds(ids[dev_mask], y[dev_mask], folds, seed)

    holdout_sorted = sorted(holdout_ids)
    n_hold_mal = int(labels.loc[holdout_sorted].sum()) if holdout_sorted else 0
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "folds_k": folds,
        "holdout_fraction": holdout,
        "manifest_sha256": manifest_sha256,
        "n_patients": len(ids),
        "n_malignant": n_per_class[1],
        "n_benign": n_per_class[0],
        "holdout": holdout_sorted,
        "n_holdout": len(holdout_sorted),
        "n_holdout_malignant": n_hold_mal,
        "n_holdout_benign": len(holdout_sorted) - n_hold_mal,
        "n_development": int(dev_mask.sum()),
        "folds": fold_list,
    }


def _choose_holdout(ids: np.ndarray, y: np.ndarray, counts: dict[int, int], seed: int) -> list[str]:
    """A seeded permutation within each class (ids sorted first: input row order never
    matters); the first ``counts[c]`` patients of class ``c`` are held out."""
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    if sum(counts.values()) == 0:
        return chosen
    for c in (0, 1):
        members = ids[y == c]
        picked = rng.permutation(len(members))[: counts[c]]
        chosen.extend(str(members[i]) for i in picked)
    return chosen


def _make_folds(dev_ids: np.ndarray, dev_y: np.ndarray, folds: int, seed: int) -> list[dict]:
    """Stratified folds of the development patients, each with both classes."""
    from sklearn.model_selection import StratifiedGroupKFold

    # One row per patient, grouped by patient: grouping is trivially satisfied, but keeps the
    # contract explicit should anyone pass image rows here later.
    sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_list: list[dict[str, Any]] = []
    for k, (_, val_idx) in enumerate(sgkf.split(dev_ids, dev_y, groups=dev_ids)):
        val = sorted(str(dev_ids[i]) for i in val_idx)
        n_mal = int(dev_y[val_idx].sum())
        n_ben = len(val) - n_mal
        if n_mal == 0 or n_ben == 0:
            missing = "malignant" if n_mal == 0 else "benign"
            raise SplitError(
                f"fold {k} would hold no {missing} patient; use fewer folds (splits.folds) "
                "or more patients"
            )
        fold_list.append(
            {"val": val, "n_val": len(val), "n_val_malignant": n_mal, "n_val_benign": n_ben}
        )
    return fold_list


def _check_settings(folds: Any, holdout: Any, seed: Any) -> tuple[int, float, int]:
    if isinstance(folds, bool) or not isinstance(folds, int | np.integer) or folds < 2:
        raise SplitError(f"splits.folds must be an integer of at least 2 (got {folds!r})")
    try:
        fraction = float(holdout)
    except (TypeError, ValueError):
        raise SplitError(f"splits.holdout must be a fraction in [0, 1) (got {holdout!r})") from None
    if not (0.0 <= fraction < 1.0) or math.isnan(fraction):
        raise SplitError(f"splits.holdout must be a fraction in [0, 1) (got {holdout!r})")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise SplitError(f"splits.seed must be an integer (got {seed!r})")
    return int(folds), fraction, int(seed)


_GRID = tuple(x / 100 for x in range(1, 100))  # holdout fractions tried for advice


def _feasible(n_per_class: dict[int, int], fraction: float, folds: int) -> bool:
    """Whether ``fraction`` gives a holdout with both classes and ``folds`` folds with both."""
    if fraction == 0:
        return all(n >= folds for n in n_per_class.values())
    counts = _holdout_counts(n_per_class, fraction)
    return all(counts[c] >= 1 and n_per_class[c] - counts[c] >= folds for c in (0, 1))


def _check_fold_counts(
    n_per_class: dict[int, int], counts: dict[int, int], folds: int, holdout: float
) -> None:
    """Each fold needs one patient of each class: K development patients per class."""
    dev = {c: n_per_class[c] - counts[c] for c in (0, 1)}
    short = [c for c in (0, 1) if dev[c] < folds]
    if not short:
        return
    c = short[0]
    where = "in the manifest" if holdout == 0 else f"left after a {holdout} holdout"
    fixes = []
    if min(dev.values()) >= 2:
        fixes.append(f"at most {min(dev.values())} folds (splits.folds)")
    if holdout > 0:
        smaller = [f for f in _GRID if f < holdout and _feasible(n_per_class, f, folds)]
        if smaller:
            fixes.append(f"a smaller holdout such as splits.holdout: {smaller[-1]}")
        elif _feasible(n_per_class, 0.0, folds):
            fixes.append("no holdout (splits.holdout: 0)")
    fixes.append("more patients")
    raise SplitError(
        f"too few {_class_name(c)} patients for {folds} folds: {dev[c]} {where} "
        f"({n_per_class[c]} in total), at least {folds} needed (one per fold); development "
        f"patients: benign {dev[0]}, malignant {dev[1]} for splits.folds = {folds}; "
        + _either(fixes)
    )


def _check_holdout_counts(
    n_per_class: dict[int, int], counts: dict[int, int], folds: int, holdout: float
) -> None:
    if holdout == 0:
        return
    n = sum(n_per_class.values())
    larger = [f for f in _GRID if f > holdout and _feasible(n_per_class, f, folds)]
    fix = f"splits.holdout: {larger[0]}" if larger else "more patients"
    if sum(counts.values()) == 0:
        raise SplitError(
            f"splits.holdout {holdout} of {n} patients would leave the holdout empty; use a "
            f"larger fraction ({fix}) or splits.holdout: 0 for no holdout"
        )
    for c in (0, 1):
        if counts[c] == 0:
            what = f"{n_per_class[c]} {_class_name(c)} of {n} patients in the manifest"
            if larger:
                advice = f"use a larger fraction ({fix}) or more patients"
            else:
                advice = (
                    f"no fraction leaves one {_class_name(c)} patient in the holdout and "
                    f"{folds} in the development folds (splits.folds); use splits.holdout: 0 "
                    "(no holdout), fewer folds or more patients"
                )
            raise SplitError(
                f"splits.holdout {holdout} would hold no {_class_name(c)} patient ({what}); "
                + advice
            )


def _either(options: list[str]) -> str:
    """ "use a, b, or c"."""
    if len(options) == 1:
        return f"use {options[0]}"
    return f"use {', '.join(options[:-1])}, or {options[-1]}"


def write_splits(splits: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a splits dict atomically as byte-stable JSON."""
    return atomic_write_json(path, splits)


def summary_rows(splits: dict[str, Any]) -> list[tuple[str, int, int, int]]:
    """(place, patients, malignant, benign) per fold and for the holdout."""
    rows = [
        (f"fold {i}", f["n_val"], f["n_val_malignant"], f["n_val_benign"])
        for i, f in enumerate(splits["folds"])
    ]
    rows.append(
        (
            "holdout",
            splits["n_holdout"],
            splits["n_holdout_malignant"],
            splits["n_holdout_benign"],
        )
    )
    rows.append(("total", splits["n_patients"], splits["n_malignant"], splits["n_benign"]))
    return rows


def format_summary(rows: Iterable[tuple[str, int, int, int]]) -> str:
    lines = [f"{'set':<10}{'patients':>10}{'malignant':>11}{'benign':>8}"]
    lines += [f"{name:<10}{n:>10}{m:>11}{b:>8}" for name, n, m, b in rows]
    return "\n".join(lines)
