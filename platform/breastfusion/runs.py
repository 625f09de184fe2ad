"""The on-disk layout of searches, trials, folds and studies — the one module that names their files.

A search folder (``breastfusion search --out DIR``, or a study's ``04_…``–``06_…`` stage)::

    DIR/experiment.json          what was searched (space, data hashes, folds, fingerprint)
    DIR/trials.csv               one row per trial (written when the search ends)
    DIR/best.json                the chosen trial (only when the search finished)
    DIR/optuna.db                the persisted Optuna study (Optuna searches)
    DIR/tune/                    Ray Tune's experiment state and TensorBoard event files
    DIR/trials/<trial>/fold<k>/  config.yaml, metrics.json, predictions.csv, history.csv,
                                 model.pt (kept only where it can still be needed)
    DIR/trials/<trial>/oof_predictions.csv   the folds' validation predictions, concatenated

A study folder (``breastfusion run``)::

    STUDY/study.json             the study file that ran, and how
    STUDY/<stage>/stage.json     a finished stage: its input hash and outputs (paths relative
                                 to STUDY, so a moved study still works)

Readers raise ``UserError`` naming the file. This module stays light: no torch, no Ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion.errors import UserError
from breastfusion.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

# -- fold folder ---------------------------------------------------------------------------------
FOLD_CONFIG = "config.yaml"
FOLD_METRICS = "metrics.json"  # written last: its presence marks a finished fold
FOLD_PREDICTIONS = "predictions.csv"
FOLD_HISTORY = "history.csv"
FOLD_MODEL = "model.pt"
FOLD_CHECKPOINTS = "checkpoints"  # the engine's best.pt/last.pt while a fold trains
FOLD_TENSORBOARD = "tensorboard"

# -- search folder ------------------------------------------------------------------------------
EXPERIMENT_FILE = "experiment.json"
TRIALS_FILE = "trials.csv"
BEST_FILE = "best.json"
OPTUNA_FILE = "optuna.db"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
OOF_FILE = "oof_predictions.csv"

# -- study folder -------------------------------------------------------------------------------
STUDY_FILE = "study.json"
STAGE_FILE = "stage.json"
STAGES = (
    "01_data",
    "02_splits",
    "03_roi",
    "04_backbones_dm",
    "05_backbones_us",
    "06_fusion",
    "07_aggregate",
    "08_final",
    "09_report",
)
SEARCH_STAGES = ("04_backbones_dm", "05_backbones_us", "06_fusion")

MODALITY_ORDER = ("dm", "us", "fusion")
MODALITY_LABELS = {"dm": "DM only", "us": "US only", "fusion": "DM+US"}


def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from ``path``; anything else is a ``UserError`` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the {what} as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the {what} must hold a JSON object")
    return data


# -- folds and trials ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldDir:
    path: Path
    k: int

    @property
    def finished(self) -> bool:
        return (self.path / FOLD_METRICS).is_file()

    @property
    def model_path(self) -> Path:
        return self.path / FOLD_MODEL

    def metrics(self) -> dict[str, Any]:
        return read_json(self.path / FOLD_METRICS, "fold metrics file")

    def config(self) -> dict[str, Any]:
        """The resolved config the fold ran with (``config_hash`` dropped)."""
        from breastfusion.config import read_yaml, resolve_paths

        raw = read_yaml(self.path / FOLD_CONFIG, "fold config")
        if not isinstance(raw, dict):
            raise UserError(f"{self.path / FOLD_CONFIG}: expected a mapping of config sections")
        raw.pop("config_hash", None)
        return resolve_paths(raw, self.path)  # stored relative to the fold's folder

    def predictions(self) -> pd.DataFrame:
        import pandas as pd

        path = self.path / FOLD_PREDICTIONS
        try:
            return pd.read_csv(path, dtype={"patient_id": str})
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read the fold's predictions ({exc})") from None


def fold_index(path: Path) -> int | None:
    name = path.name
    return int(name[4:]) if name.startswith("fold") and name[4:].isdigit() else None


@dataclass(frozen=True)
class TrialDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def fold(self, k: int) -> FoldDir:
        return FoldDir(self.path / f"fold{k}", k)

    def folds(self, only: Iterable[int] | None = None) -> list[FoldDir]:
        """The trial's fold folders in fold order (``only``: these folds, present or not)."""
        if only is not None:
            return [self.fold(k) for k in only]
        found = [(fold_index(p), p) for p in self.path.glob("fold*") if p.is_dir()]
        return [FoldDir(p, k) for k, p in sorted((k, p) for k, p in found if k is not None)]

    def config(self, folds: Iterable[int] | None = None) -> dict[str, Any] | None:
        """The config of the first fold that recorded one (every fold has the same model)."""
        for f in self.folds(folds):
            if (f.path / FOLD_CONFIG).is_file():
                return f.config()
        return None

    def oof(self, folds: Iterable[int] | None = None) -> pd.DataFrame | None:
        """The folds' validation predictions with a ``fold`` column, or None if none exist."""
        import pandas as pd

        parts = [
            f.predictions().assign(fold=f.k)
            for f in self.folds(folds)
            if (f.path / FOLD_PREDICTIONS).is_file()
        ]
        return pd.concat(parts, ignore_index=True) if parts else None

    def write_oof(self, folds: Iterable[int] | None = None) -> Path | None:
        oof = self.oof(folds)
        if oof is None:
            return None
        cols = ["fold", *[c for c in oof.columns if c != "fold"]]
        return atomic_write_text(self.path / OOF_FILE, csv_text(oof[cols]))


def csv_text(df: pd.DataFrame) -> str:
    """CSV at full precision (floats as their shortest exact repr): no rounding on disk."""
    return df.to_csv(index=False, float_format=None)


@dataclass(frozen=True)
class SearchDir:
    path: Path

    @property
    def experiment_path(self) -> Path:
        return self.path / EXPERIMENT_FILE

    @property
    def trials_path(self) -> Path:
        return self.path / TRIALS_FILE

    @property
    def best_path(self) -> Path:
        return self.path / BEST_FILE

    @property
    def tune_dir(self) -> Path:
        return self.path / TUNE_DIR

    @property
    def optuna_path(self) -> Path:
        return self.path / OPTUNA_FILE

    @property
    def trials_dir(self) -> Path:
        return self.path / TRIALS_DIR

    def trial(self, name: str) -> TrialDir:
        return TrialDir(self.trials_dir / name)

    def is_search(self) -> bool:
        return self.experiment_path.is_file()

    def experiment(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such folder (expected a breastfusion search folder)")
        if not self.is_search():
            raise UserError(
                f"{self.path} is not a breastfusion search folder (no {EXPERIMENT_FILE}); "
                "pass the --out folder of `breastfusion search`"
            )
        return read_json(self.experiment_path, "search description")

    def trials_table(self) -> pd.DataFrame:
        import pandas as pd

        path = self.trials_path
        if not path.is_file():
            raise UserError(
                f"{self.path}: no {TRIALS_FILE} — the search has not finished (continue it with "
                "`--resume`) or crashed before writing its results"
            )
        try:
            table = pd.read_csv(path, dtype={"trial": str, "status": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read as CSV ({exc})") from None
        missing = [c for c in ("trial", "status", "mean_auc") if c not in table.columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
        return table

    def write_trials_table(self, table: pd.DataFrame) -> Path:
        return atomic_write_text(self.trials_path, csv_text(table))

    def best(self) -> dict[str, Any]:
        return read_json(self.best_path, "best-trial record")

    def write_best(self, record: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.best_path, dict(record))


# -- the one best-configuration rule -----------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """What the best rule looks at for one trial (from ``trials.csv`` and its config)."""

    search: str
    trial: str
    complete: bool  # every fold finished
    degenerate: bool  # some fold's model gave (nearly) constant scores
    score: float  # the CV objective: mean patient-level validation AUC over the folds
    sd: float  # SD of the fold AUCs
    n_params: int | None
    input_pixels: int

    @property
    def eligible(self) -> bool:
        return self.complete and not self.degenerate and math.isfinite(self.score)


DEFAULT_TIE_TOLERANCE = 0.001


def selection_rule(tie_tolerance: float = DEFAULT_TIE_TOLERANCE) -> str:
    """The rule that picks a configuration, in words (written next to every choice)."""
    return (
        "highest mean patient-level validation AUC over the folds, among complete trials "
        "(every fold finished) whose fold models are not degenerate; trials within "
        f"{tie_tolerance:g} AUC of the highest count as tied, and a tie goes to the fewest "
        "backbone parameters, then the smallest input (pixels summed over the branches used), "
        "then the lowest fold SD, then the search and trial name"
    )


def choose_best(
    candidates: Sequence[Candidate], tie_tolerance: float = DEFAULT_TIE_TOLERANCE
) -> Candidate | None:
    """The best eligible candidate by ``selection_rule``; None when there is none.

    Every place that says "best" (the search's ``best.json``, aggregation, ``final --search``,
    the report) calls this. Ray Tune's ``ExperimentAnalysis.get_best_trial`` is NOT this rule
    (it also ranks stopped and degenerate trials by their last reported value).
    """
    pool = [c for c in candidates if c.eligible]
    if not pool:
        return None
    top = max(c.score for c in pool)
    tied = [c for c in pool if c.score >= top - tie_tolerance - 1e-12]
    return min(
        tied,
        key=lambda c: (
            c.n_params if c.n_params is not None else math.inf,
            c.input_pixels,
            c.sd if math.isfinite(c.sd) else math.inf,
            c.search,
            c.trial,
        ),
    )


def config_value(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    section, _, name = dotted.partition(".")
    block = cfg.get(section)
    return block.get(name, default) if isinstance(block, Mapping) else default


@dataclass(frozen=True)
class Architecture:
    modality: str
    backbone: str  # "resnet18" or "resnet18+resnet18" (DM+US)
    n_params: int | None  # backbone parameters (heads add a few thousand; ignored)
    input_pixels: int


def architecture(cfg: Mapping[str, Any]) -> Architecture:
    """The facts the best rule and the tables need from a resolved config dict."""
    from breastfusion.models.registry import backbone_params

    modality = str(config_value(cfg, "data.modality", "fusion"))
    branches = ("dm", "us") if modality == "fusion" else (modality,)
    names = [str(config_value(cfg, f"model.backbone_{b}", "resnet18")) for b in branches]
    counts = [backbone_params(n) for n in names]
    params = None if any(c is None for c in counts) else sum(c for c in counts if c is not None)
    pixels = 0
    for b in branches:
        size = config_value(cfg, f"data.size_{b}", 224)
        pixels += int(size) ** 2 if isinstance(size, int | float) else 0
    return Architecture(modality, "+".join(names), params, pixels)


def candidate(search: str, row: Mapping[str, Any], cfg: Mapping[str, Any]) -> Candidate:
    """A ``trials.csv`` row (as a mapping) and the trial's resolved config → ``Candidate``."""
    arch = architecture(cfg)

    def num(key: str) -> float:
        v = row.get(key)
        try:
            return float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            return math.nan

    degenerate = row.get("degenerate")
    return Candidate(
        search=search,
        trial=str(row["trial"]),
        complete=str(row.get("status")) == "complete",
        degenerate=bool(degenerate) and str(degenerate).lower() not in ("false", "0", "nan"),
        score=num("mean_auc"),
        sd=num("std_auc"),
        n_params=arch.n_params,
        input_pixels=arch.input_pixels,
    )


# -- study folder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyDir:
    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def study_file(self) -> Path:
        return self.root / STUDY_FILE

    def is_study(self) -> bool:
        return self.study_file.is_file()

    def stage_record(self, name: str) -> dict[str, Any] | None:
        """A finished stage's record with its outputs as absolute paths under this root."""
        path = self.stage(name) / STAGE_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict):
            return None
        record["outputs"] = self.absolute(record.get("outputs") or {})
        return record

    def write_stage(self, name: str, record: Mapping[str, Any]) -> Path:
        """Write ``stage.json``; output paths under the root are stored relative to it."""
        rec = dict(record)
        rec["outputs"] = self.relative(rec.get("outputs") or {})
        return atomic_write_json(self.stage(name) / STAGE_FILE, rec)

    def relative(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: _rel(v, self.root) for k, v in outputs.items()}

    def absolute(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: _abs(v, self.root) for k, v in outputs.items()}

    @property
    def report_path(self) -> Path:
        return self.stage("09_report") / "index.html"


_REL = "@study/"  # marks a stored path as relative to the study root


def _rel(value: Any, root: Path) -> Any:
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith("/")):
        p = Path(value)
        try:
            return _REL + p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return str(p)
    return value


def _abs(value: Any, root: Path) -> Any:
    if isinstance(value, str) and value.startswith(_REL):
        return str(root / value[len(_REL) :])
    return value


# -- relocatable records -------------------------------------------------------------------------

# Folders of searches and results, and a config's data locations (``data.manifest`` …).
PATH_KEYS = ("search_dir", "dir", "manifest", "splits", "cache_dir")


def portable(obj: Any, base: Path, keys: Sequence[str] = PATH_KEYS) -> Any:
    """``obj`` with the values of path keys (``PATH_KEYS``) made relative to ``base``
    (the folder of the file being written), so a moved study or results folder still reads."""
    import os

    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if k in keys and isinstance(v, str | Path) and Path(v).is_absolute():
                v = Path(os.path.relpath(Path(v), Path(base).resolve())).as_posix()
            out[k] = portable(v, base, keys)
        return out
    if isinstance(obj, list | tuple):
        return [portable(v, base, keys) for v in obj]
    return obj


def resolved(obj: Any, base: Path, keys: Sequence[str] = PATH_KEYS) -> Any:
    """The inverse of ``portable``: relative path values resolved against ``base``."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if k in keys and isinstance(v, str) and v and not Path(v).is_absolute():
                v = str((Path(base) / v).resolve())
            out[k] = resolved(v, base, keys)
        return out
    if isinstance(obj, list):
        return [resolved(v, base, keys) for v in obj]
    return obj
