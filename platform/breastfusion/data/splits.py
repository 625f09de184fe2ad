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

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from breastfusion.errors import SplitError
from breastfusion.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MAX_LISTED = 20  # patients named in one message before "... and N more"


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
        raise SplitError("cannot make splits: patient(s) with both labels: " + _names(conflicting))
    labels = per_patient.groupby("patient_id")["y"].first()
    return labels.sort_index()


def _names(ids: Sequence[str]) -> str:
    ids = list(ids)
    shown = ", ".join(ids[:_MAX_LISTED])
    if len(ids) > _MAX_LISTED:
        shown += f", ... and {len(ids) - _MAX_LISTED} more"
    return shown


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
    dict (and bytes) on every machine.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if isinstance(folds, bool) or not isinstance(folds, int | np.integer) or folds < 2:
        raise SplitError(f"--folds must be an integer of at least 2 (got {folds!r})")
    folds = int(folds)
    try:
        holdout = float(holdout)
    except (TypeError, ValueError):
        raise SplitError(f"--holdout must be a fraction in [0, 1) (got {holdout!r})") from None
    if not (0.0 <= holdout < 1.0) or math.isnan(holdout):
        raise SplitError(f"--holdout must be a fraction in [0, 1) (got {holdout!r})")
    seed = int(seed)

    labels = patient_labels(df)
    ids = np.asarray(labels.index, dtype=object)
    y = labels.to_numpy()
    n_per_class = {c: int((y == c).sum()) for c in (0, 1)}

    # Holdout: a seeded permutation within each class (patients sorted by id first, so the
    # input row order never matters).
    rng = np.random.default_rng(seed)
    holdout_ids: list[str] = []
    if holdout > 0:
        counts = _holdout_counts(n_per_class, holdout)
        if sum(counts.values()) == 0:
            raise SplitError(
                f"--holdout {holdout} of {len(ids)} patients would leave the holdout empty; "
                "use a larger fraction or --holdout 0 for no holdout"
            )
        for c in (0, 1):
            if counts[c] == 0:
                raise SplitError(
                    f"--holdout {holdout} would hold no {_class_name(c)} patient "
                    f"({n_per_class[c]} {_class_name(c)} of {len(ids)} patients in the "
                    "manifest); use a larger fraction or more patients"
                )
            members = ids[y == c]
            chosen = rng.permutation(len(members))[: counts[c]]
            holdout_ids.extend(str(members[i]) for i in chosen)
    holdout_set = set(holdout_ids)

    dev_mask = np.array([pid not in holdout_set for pid in ids])
    dev_ids, dev_y = ids[dev_mask], y[dev_mask]
    for c in (0, 1):
        n_c = int((dev_y == c).sum())
        if n_c < folds:
            where = "in the manifest" if holdout == 0 else f"left after a {holdout} holdout"
            raise SplitError(
                f"too few {_class_name(c)} patients for {folds} folds: {n_c} {where} "
                f"({n_per_class[c]} in total), at least {folds} needed "
                "(one per fold); use fewer folds, a smaller holdout or more patients"
            )

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
                f"fold {k} would hold no {missing} patient; use fewer folds or more patients"
            )
        fold_list.append(
            {"val": val, "n_val": len(val), "n_val_malignant": n_mal, "n_val_benign": n_ben}
        )

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


def write_splits(splits: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a splits dict atomically as byte-stable JSON."""
    return atomic_write_json(path, splits)


# --------------------------------------------------------------------------------------------
# Reading and checking splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    """The validation patients of one fold; its training patients are the other folds'."""

    index: int
    val: tuple[str, ...]


@dataclass(frozen=True)
class Splits:
    """Splits as read from disk. All id tuples are sorted str patient ids."""

    holdout: tuple[str, ...]
    folds: tuple[Fold, ...]
    development: tuple[str, ...]
    k: int
    seed: int
    manifest_sha256: str = ""
    holdout_fraction: float = 0.0
    source: str = ""  # the file the splits came from, for messages

    def train_val(self, k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(train ids, validation ids) of fold ``k``; both sorted, disjoint, no holdout ids."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < self.k:
            raise SplitError(
                f"fold {k!r} does not exist{self._where()}: valid folds are 0..{self.k - 1}"
            )
        val = self.folds[int(k)].val
        val_set = set(val)
        train = tuple(pid for pid in self.development if pid not in val_set)
        return train, val

    def _where(self) -> str:
        return f" in {self.source}" if self.source else ""


def _splits_from_dict(data: Any, source: str) -> Splits:
    """Structure checks on a parsed splits file; content checks are ``check_splits``'s job."""

    def bad(why: str) -> SplitError:
        return SplitError(f"{source}: not a valid splits file: {why}")

    if not isinstance(data, dict):
        raise bad("the top level is not a JSON object")
    for key in ("holdout", "folds", "seed"):
        if key not in data:
            raise bad(f"missing key '{key}'")
    holdout = data["holdout"]
    if not isinstance(holdout, list) or not all(isinstance(p, str) for p in holdout):
        raise bad("'holdout' must be a list of patient ids (strings)")
    raw_folds = data["folds"]
    if not isinstance(raw_folds, list) or len(raw_folds) < 2:
        raise bad("'folds' must be a list of at least 2 folds")
    folds = []
    for i, f in enumerate(raw_folds):
        if not isinstance(f, dict) or "val" not in f:
            raise bad(f"fold {i} has no 'val' list")
        val = f["val"]
        if not isinstance(val, list) or not all(isinstance(p, str) for p in val):
            raise bad(f"fold {i}: 'val' must be a list of patient ids (strings)")
        folds.append(Fold(index=i, val=tuple(sorted(val))))
    k = data.get("folds_k", len(folds))
    if k != len(folds):
        raise bad(f"'folds_k' is {k!r} but the file lists {len(folds)} folds")
    seed = data["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad("'seed' must be an integer")
    sha = data.get("manifest_sha256", "")
    if not isinstance(sha, str):
        raise bad("'manifest_sha256' must be a string")
    development = tuple(sorted({pid for f in folds for pid in f.val}))
    return Splits(
        holdout=tuple(sorted(holdout)),
        folds=tuple(folds),
        development=development,
        k=len(folds),
        seed=seed,
        manifest_sha256=sha,
        holdout_fraction=float(data.get("holdout_fraction", 0.0) or 0.0),
        source=source,
    )


def _places(splits: Splits) -> dict[str, list[str]]:
    """patient id -> every place it appears ("holdout", "fold 2", ...), duplicates kept."""
    where: dict[str, list[str]] = {}
    for pid in splits.holdout:
        where.setdefault(pid, []).append("holdout")
    for fold in splits.folds:
        for pid in fold.val:
            where.setdefault(pid, []).append(f"fold {fold.index}")
    return where


def check_splits(splits: Splits, df: pd.DataFrame) -> None:
    """Refuse splits that leak or do not cover the manifest exactly.

    Finds: a patient in two places (holdout and a fold, two folds, or twice in one list);
    a manifest patient in no place; a splits patient absent from the manifest. Raises one
    ``SplitError`` listing every problem with the patients named.
    """
    if "patient_id" not in df.columns:
        raise SplitError("cannot check splits: the manifest table has no 'patient_id' column")
    src = f"{splits.source}: " if splits.source else ""
    where = _places(splits)
    problems: list[str] = []

    leaked = sorted(pid for pid, places in where.items() if len(places) > 1)
    if leaked:
        shown = [f"{pid} ({' and '.join(where[pid])})" for pid in leaked]
        problems.append(f"{len(leaked)} patient(s) in more than one place: " + _names(shown))

    manifest_ids = set(df["patient_id"].astype(str))
    missing = sorted(manifest_ids - where.keys())
    if missing:
        problems.append(
            f"{len(missing)} manifest patient(s) in neither the holdout nor any fold: "
            + _names(missing)
        )
    unknown = sorted(where.keys() - manifest_ids)
    if unknown:
        problems.append(
            f"{len(unknown)} patient(s) in the splits but not in the manifest: " + _names(unknown)
        )
    if problems:
        raise SplitError(
            f"{src}splits do not match the manifest (patient leakage or a different cohort)",
            details=problems,
        )


def load_splits(
    path: str | os.PathLike, df: pd.DataFrame, *, manifest_sha256: str | None = None
) -> Splits:
    """Read a splits file and check it against the manifest table ``df`` (always).

    ``manifest_sha256``, when given, is compared with the hash recorded in the file; a mismatch
    is only a warning, because derived manifests (e.g. ROI crops) keep the same patients under
    a different file — the leakage check is what guards correctness.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SplitError(
            f"{path}: splits file not found (make one with `breastfusion split`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SplitError(f"{path}: cannot read splits file: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SplitError(f"{path}: not valid JSON ({exc})") from None
    splits = _splits_from_dict(data, str(path))
    if manifest_sha256 and splits.manifest_sha256 and manifest_sha256 != splits.manifest_sha256:
        log.warning(
            "%s was made from a manifest with sha256 %s…, not this one (%s…); "
            "patients are checked for leakage, so a derived manifest is fine",
            path,
            splits.manifest_sha256[:12],
            manifest_sha256[:12],
        )
    check_splits(splits, df)
    return splits


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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


@click.command("split")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--folds", default=5, show_default=True, type=int, help="Number of CV folds (K).")
@click.option(
    "--holdout",
    default=0.2,
    show_default=True,
    type=float,
    help="Fraction of patients held out as the test cohort (0 for none).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the splits JSON.",
)
def split_command(manifest: Path, folds: int, holdout: float, seed: int, out: Path) -> None:
    """Split MANIFEST's patients into a holdout cohort and K stratified folds."""
    from breastfusion.data.manifest import load_manifest

    df = load_manifest(manifest)
    splits = make_splits(
        df, folds=folds, holdout=holdout, seed=seed, manifest_sha256=sha256_file(manifest)
    )
    write_splits(splits, out)
    click.echo(format_summary(summary_rows(splits)))
    click.echo(f"wrote {out}")
