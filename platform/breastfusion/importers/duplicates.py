"""Exact and near duplicates among imported images, turned into pseudo-patients.

Sets without patient ids (BUSI, a folder tree) hold copies of one lesion as separate
"patients"; copies in different partitions leak test images into training. Each image is
decoded once: a pixel hash finds exact copies, a perceptual hash
(``data.near_duplicates``) finds resized, re-encoded or brightness-shifted ones.

Exact copies follow option ``duplicates`` (``group`` | ``drop`` | ``warn``). Near copies
follow option ``near_duplicates``: ``group`` (default) joins the patients holding them into
one pseudo-patient (union-find over the pairs, so chains of copies end up together) and
excludes groups whose images disagree on the label (which one is right is unknown);
``report`` only lists the pairs; ``off`` skips the check. Every pair, with what was done,
goes to the import report and to ``<manifest>.near_duplicates.csv``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from breastfusion.data import near_duplicates as nd
from breastfusion.errors import UserError
from breastfusion.importers.common import ImportReport, Row, _ImageProblem, read_pixels

DUPLICATE_POLICIES: tuple[str, ...] = ("group", "drop", "warn")
NEAR_POLICIES: tuple[str, ...] = ("group", "report", "off")
_THREADS = 4  # decoding waits on disk and zlib, which release the GIL

Fingerprint = tuple[str, "nd.Signature"]


def pixel_hash(path: Path) -> str:
    """SHA-256 of the decoded pixels (and shape): re-encoded copies still match."""
    return _pixel_hash(read_pixels(path))


def _pixel_hash(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def dhash(path: Path) -> int:
    """64-bit difference hash of an image file (see ``data.near_duplicates``)."""
    return nd.signature_of(read_pixels(path)).code


def _fingerprints(rows: Sequence[Row]) -> list[Fingerprint | None]:
    """(pixel hash, signature) per row from one decode; None for unreadable images."""

    def one(r: Row) -> Fingerprint | None:
        try:
            arr = read_pixels(r.image)
        except _ImageProblem:
            return None  # the row's own image check reports unreadable files
        return _pixel_hash(arr), nd.signature_of(arr)

    if not rows:
        return []
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(rows))) as pool:
        return list(pool.map(one, rows))


def handle_duplicates(
    rows: list[Row],
    policy: str,
    report: ImportReport,
    *,
    near: str = "off",
    max_distance: int = nd.MAX_DISTANCE,
    name_of: Callable[[Row], str] = lambda r: r.image.name,
) -> list[Row]:
    """Apply the exact (``policy``) and near (``near``) duplicate policies; rows to keep."""
    if policy not in DUPLICATE_POLICIES:
        raise UserError(
            f"option 'duplicates' must be one of {', '.join(DUPLICATE_POLICIES)} (got {policy!r})"
        )
    if near not in NEAR_POLICIES:
        raise UserError(
            f"option 'near_duplicates' must be one of {', '.join(NEAR_POLICIES)} (got {near!r})"
        )
    prints = _fingerprints(rows)
    drop = _exact(rows, [f[0] if f else None for f in prints], policy, report, name_of)
    keep = [i for i in range(len(rows)) if i not in drop]
    report.near_duplicates = near
    if near != "off":
        excluded = _near(
            [rows[i] for i in keep], [prints[i] for i in keep], near, max_distance, report, name_of
        )
        keep = [i for k, i in enumerate(keep) if k not in excluded]
    return [rows[i] for i in keep]


def _exact(
    rows: list[Row], hashes: list[str | None], policy: str, report: ImportReport, name_of
) -> set[int]:
    """Exact copies: group their patients, drop, or warn; returns the row indices to drop."""
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h is not None:
            by_hash.setdefault(h, []).append(i)
    drop: set[int] = set()
    joins: list[tuple[str, str]] = []
    for idx in by_hash.values():
        if len(idx) < 2:
            continue
        group = [rows[i] for i in idx]
        report.duplicate_groups.append([name_of(r) for r in group])
        if policy == "warn":
            continue
        if len({r.label for r in group}) > 1:
            for i in idx:
                drop.add(i)
                report.skip(name_of(rows[i]), "exact duplicate with conflicting labels")
        elif policy == "drop":
            for i in idx[1:]:
                drop.add(i)
                report.skip(name_of(rows[i]), "exact duplicate (dropped; first copy kept)")
        else:  # group: every patient holding a copy becomes one patient
            joins += [(group[0].patient_id, r.patient_id) for r in group[1:]]
    _join_patients(rows, joins)
    if report.duplicate_groups:
        report.warn(
            f"{len(report.duplicate_groups)} group(s) of pixel-identical images (policy '{policy}')"
        )
    return drop


def _join_patients(rows: Sequence[Row], joins: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Give joined patients one id: that of the one whose image comes first in ``rows``."""
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r.patient_id, i)
    new_id = {}
    for group in nd.components(joins):
        keep = min(group, key=lambda pid: first.get(pid, len(rows)))
        new_id.update({pid: keep for pid in group})
    for r in rows:
        r.patient_id = new_id.get(r.patient_id, r.patient_id)
    return new_id


def _near(
    rows: list[Row],
    prints: list[Fingerprint | None],
    policy: str,
    max_distance: int,
    report: ImportReport,
    name_of,
) -> set[int]:
    """Find near copies across patients; group or report them. Returns indices to exclude."""
    usable = [k for k, f in enumerate(prints) if f is not None]
    items = [
        nd.Item(name=name_of(rows[k]), patient=rows[k].patient_id, label=rows[k].label,
                modality=rows[k].modality, row=k)
        for k in usable
    ]  # fmt: skip
    sigs = [prints[k][1] for k in usable]  # type: ignore[index]
    exact = {name: g for g, names in enumerate(report.duplicate_groups) for name in names}

    def keep(a: nd.Item, b: nd.Item) -> bool:
        same_copy = a.name in exact and exact.get(b.name) == exact[a.name]
        return a.patient != b.patient and not same_copy  # exact copies are handled above

    pairs = nd.find_pairs(items, sigs, max_distance=max_distance, keep=keep)
    excluded: set[int] = set()
    action = {id(p): "reported" for p in pairs}
    if policy == "group":
        excluded = _group(rows, pairs, action, report, name_of)
    new_patient = {name_of(r): r.patient_id for r in rows}
    for p in pairs:
        rec = p.record()
        rec["action"] = action[id(p)]
        rec["patient"] = "" if action[id(p)] != "grouped" else new_patient[p.a.name]
        report.near_duplicate_pairs.append(rec)
    if pairs and policy == "report":
        report.warn(
            f"{len(pairs)} near-duplicate pair(s) across patients, only reported (option "
            "'near_duplicates' is 'report'): they may leak between partitions"
        )
    return excluded


def _group(rows, pairs, action, report: ImportReport, name_of) -> set[int]:
    """One pseudo-patient per group of near copies; groups with both labels excluded."""
    by_name = {name_of(r): k for k, r in enumerate(rows)}
    excluded: set[int] = set()
    joins: list[tuple[str, str]] = []
    conflicting: set[str] = set()
    for group in nd.components((p.a.name, p.b.name) for p in pairs):
        members = [rows[by_name[n]] for n in group]
        if len({r.label for r in members}) > 1:
            conflicting |= set(group)
            report.near_excluded_groups += 1
            for n in group:
                excluded.add(by_name[n])
                report.skip(n, "near duplicate with conflicting labels")
        else:
            report.near_groups += 1
            joins += [(members[0].patient_id, r.patient_id) for r in members[1:]]
    for p in pairs:
        action[id(p)] = "excluded: conflicting labels" if p.a.name in conflicting else "grouped"
    _join_patients([r for k, r in enumerate(rows) if k not in excluded], joins)
    return excluded
