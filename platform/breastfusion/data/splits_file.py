"""Reading a splits file and checking it against its manifest (see ``data.splits``).

``load_splits`` re-checks every read: a splits file that silently disagrees with its manifest
(a patient in two places, a patient missing, a different cohort) is how leakage creeps in.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.errors import SplitError

# The splits API's one logger, whichever of its modules speaks.
log = logging.getLogger("breastfusion.data.splits")

_MAX_LISTED = 20  # patients named in one message before "... and N more"


def name_list(ids: Sequence[str]) -> str:
    ids = list(ids)
    shown = ", ".join(ids[:_MAX_LISTED])
    if len(ids) > _MAX_LISTED:
        shown += f", ... and {len(ids) - _MAX_LISTED} more"
    return shown


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
        problems.append(f"{len(leaked)} patient(s) in more than one place: " + name_list(shown))

    manifest_ids = set(df["patient_id"].astype(str))
    missing = sorted(manifest_ids - where.keys())
    if missing:
        problems.append(
            f"{len(missing)} manifest patient(s) in neither the holdout nor any fold: "
            + name_list(missing)
        )
    unknown = sorted(where.keys() - manifest_ids)
    if unknown:
        problems.append(
            f"{len(unknown)} patient(s) in the splits but not in the manifest: "
            + name_list(unknown)
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
