"""The search folder's description and claim: what a search is, and whether DIR may hold it.

``experiment.json`` describes a search (space, data hashes, folds, base configuration); its
fingerprint decides whether ``--resume`` continues the same search. The data count by content
(sha256), not by path, so a search folder moved with its data still resumes. A folder holding another
search is refused with the keys that differ; a folder holding foreign files is refused;
ownership goes through ``breastfusion.fsguard``. Light: no Ray, no torch.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from breastfusion import fsguard, runs
from breastfusion.config import Config
from breastfusion.errors import UserError


def resume_command_for(
    space: Path | None,
    manifest: Path,
    splits: Path,
    out: Path,
    debug: bool,
    *,
    allow_outside: bool = False,
) -> str:
    parts = ["breastfusion", "search", "--space", str(space or "SPACE.yaml")]
    parts += ["--manifest", str(manifest), "--splits", str(splits), "--out", str(out)]
    parts += ["--allow-outside"] if allow_outside else []
    parts += ["--resume", *(["--debug"] if debug else [])]
    return " ".join(shlex.quote(p) for p in parts)


def claim_output(
    out: Path, experiment: dict, fingerprint: str, resume: bool, also: tuple[str, ...] = ()
) -> None:
    """Refuse a folder that holds another experiment (naming what differs), this one without
    ``resume``, or foreign files; then mark it as a search folder. ``also``: fingerprints an
    earlier version gave this same experiment."""
    folder = runs.SearchDir(out)
    if folder.is_search():
        previous = folder.experiment()
        if previous.get("fingerprint") not in (fingerprint, *also):
            diffs = describe_differences(previous, experiment)
            raise UserError(
                f"{out} holds a different experiment; what differs: {'; '.join(diffs[:6])}"
                f"{' …' if len(diffs) > 6 else ''}. Choose another output folder, or resume "
                "with the original space, data and settings"
            )
        if not resume:
            raise UserError(f"{out} already holds this experiment; pass --resume to continue it")
        # A search folder from before ownership markers is still this command's.
        fsguard.claim(out, "search", overwrite=fsguard.owner(out) is None)
        return
    if resume:
        raise UserError(f"nothing to resume in {out} (no {runs.EXPERIMENT_FILE})")
    foreign = fsguard.foreign_entries(out)
    if foreign and not fsguard.owns(out, "search"):
        raise UserError(
            f"{out} is not empty ({', '.join(foreign[:5])}) and holds no breastfusion search; "
            "choose a new or empty folder"
        )
    fsguard.claim(out, "search")


def describe_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two experiment descriptions."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            if key == "fingerprint" and not prefix:
                continue
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name} added ({new[key]!r})")
            elif key not in new:
                out.append(f"{name} removed (was {old[key]!r})")
            else:
                out += describe_differences(old[key], new[key], name)
        return out
    if old == new:
        return []
    label = {"manifest_sha256": "the manifest's content", "splits_sha256": "the splits' content"}
    if prefix in label:
        return [f"{label[prefix]} changed"]
    if prefix == "base_config_hash":
        return ["the fixed base configuration changed (settings other than the data's location)"]
    return [f"{prefix}: {old!r} → {new!r}"]


def cohort_facts(df: pd.DataFrame, split_set: Any, cfg: Config, folds: list[int]) -> list[str]:
    """What every fold of every trial would otherwise warn about, said once by the driver."""
    dev = set(map(str, split_set.development))
    table = df[df["patient_id"].astype(str).isin(dev)]
    have = table.groupby(table["patient_id"].astype(str))["modality"].agg(lambda m: set(m))
    needs = {"fusion": {"DM", "US"}, "dm": {"DM"}, "us": {"US"}}[cfg.data.modality]
    lacking = int(sum(1 for mods in have if not needs <= set(mods)))
    malignant = int(table.groupby(table["patient_id"].astype(str))["y"].max().sum())
    lines = [
        f"cohort: {len(have)} development patients ({malignant} malignant) in "
        f"{split_set.k} folds; this search uses fold(s) {folds}"
    ]
    if lacking:
        what = (
            "a DM or a US image (the pairs need both)"
            if cfg.data.modality == "fusion"
            else f"a {cfg.data.modality.upper()} image"
        )
        lines.append(
            f"  note: {lacking} patient(s) lack {what} and are left out of every fold "
            "(said once here, not per fold)"
        )
    if cfg.data.max_patients is not None:
        lines.append(f"  note: data.max_patients {cfg.data.max_patients} caps each fold's sets")
    return lines
