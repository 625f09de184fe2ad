"""The study file (``breastfusion run STUDY.yaml``), typed: every study default lives here.

Each section of the YAML is a frozen dataclass (``breastfusion.study_sections``) built by a
strict ``from_dict(raw, prefix)`` that refuses unknown keys naming the full key and the
allowed ones (``roi.crop.marginn`` → "unknown setting roi.crop.marginn; allowed under
roi.crop: margin, …"). The ROI sections are the ROI area's own
``DetectorTrainSettings``/``CropSettings``. ``load_study`` validates the
whole file — search spaces and ``base`` overrides against ``breastfusion.config`` included —
before any stage runs, so a typo fails in seconds and writes nothing.

Relative paths (``data.manifest``, ``data.cache_dir``, ``roi.train.weights``, search-space
files) are resolved against the study file's folder. ``StudyConfig.for_debug()`` is the one
place that says what ``--debug`` shrinks. ``StudyConfig.stage_settings(stage)`` is what a
stage's hash covers: its resolved settings with every default filled in, so a changed default
re-runs the stage. Light module: no torch, no Ray.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breastfusion.errors import ConfigError
from breastfusion.study_sections import (  # noqa: F401  (re-exported: the study's settings)
    ROI_MODES,
    AggregateSettings,
    DataSettings,
    FinalSettings,
    ReportSettings,
    RoiSettings,
    Section,
    SplitSettings,
    SyntheticSettings,
    TrackingSettings,
    _unknown,
)

if typing.TYPE_CHECKING:
    from breastfusion.config import Config
    from breastfusion.distributed.space import SearchSpace

SEARCH_KEYS = ("dm", "us", "fusion")  # backbones.dm, backbones.us, fusion


@dataclass(frozen=True)
class SearchRef:
    """One search of the study: its space, as given (a file or an inline mapping)."""

    key: str  # dm | us | fusion
    stage: str  # 04_backbones_dm | 05_backbones_us | 06_fusion
    file: str | None  # the space's YAML (absolute), None when inline
    space: SearchSpace

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "space": self.space.source}


STAGE_OF_SEARCH = {"dm": "04_backbones_dm", "us": "05_backbones_us", "fusion": "06_fusion"}
_TOP = (
    "name",
    "description",
    "out",
    "data",
    "splits",
    "roi",
    "base",
    "backbones",
    "fusion",
    "aggregate",
    "final",
    "report",
    "tracking",
)
# How much --debug shrinks (StudyConfig.for_debug); searches shrink by SearchSpace.for_debug.
DEBUG_ROI_EPOCHS = 2
DEBUG_BOOTSTRAP = 200
DEBUG_GRADCAM = 1


@dataclass(frozen=True)
class StudyConfig:
    """A validated study file (see jobs/demo.yaml for a commented example)."""

    name: str
    description: str
    path: Path  # the study file (absolute)
    out: Path | None  # its ``out`` (absolute), if it names one
    data: DataSettings
    splits: SplitSettings
    roi: RoiSettings
    base: dict[str, Any]  # dotted training-config overrides for every model of the study
    searches: dict[str, SearchRef]  # by key: dm, us, fusion (those the study runs)
    aggregate: AggregateSettings
    final: FinalSettings
    report: ReportSettings
    tracking: TrackingSettings
    debug: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def base_config(self) -> Config:
        """``Config()`` with ``base`` applied (and the study's data options)."""
        from breastfusion.config import Config

        extra: dict[str, Any] = {}
        if self.data.cache_dir is not None:
            extra["data.cache_dir"] = self.data.cache_dir
        if self.data.allow_outside:
            extra["data.allow_outside"] = True
        return Config().with_overrides({**self.base, **extra})

    def for_debug(self) -> StudyConfig:
        """The same stages in minutes: the one place that says what ``--debug`` changes.

        ROI: at most ``DEBUG_ROI_EPOCHS`` detector epochs. Searches: fold 0 only and
        ``SearchSpace.for_debug`` (1 epoch, few patients, small images, <= 2 trials), applied
        by ``search(debug=True)``. Aggregation, final and report: at most
        ``DEBUG_BOOTSTRAP`` resamples; ``DEBUG_GRADCAM`` Grad-CAM patient per category."""
        if self.debug:
            return self

        def fewer(section: Any, **limits: int) -> Any:
            cut = {k: min(getattr(section, k), v) for k, v in limits.items()}
            return dataclasses.replace(section, **cut)

        train = fewer(self.roi.train, epochs=DEBUG_ROI_EPOCHS)
        gradcam = self.report.gradcam_per_category
        return dataclasses.replace(
            self,
            roi=dataclasses.replace(self.roi, train=train),
            aggregate=fewer(self.aggregate, bootstrap=DEBUG_BOOTSTRAP),
            final=fewer(self.final, bootstrap=DEBUG_BOOTSTRAP, gradcam_per_category=DEBUG_GRADCAM),
            report=dataclasses.replace(
                fewer(self.report, bootstrap=DEBUG_BOOTSTRAP),
                gradcam_per_category=None if gradcam is None else min(gradcam, DEBUG_GRADCAM),
            ),
            debug=True,
        )

    def search_space(self, key: str) -> SearchSpace:
        """The space search ``key`` runs (shrunk under ``--debug``, as ``search`` does)."""
        space = self.space_for_search(key)
        return space.for_debug() if self.debug else space

    def space_for_search(self, key: str) -> SearchSpace:
        """The space the stage hands to ``search`` (which shrinks it itself under --debug)."""
        space = self.searches[key].space
        if "keep_checkpoints" not in space.source and self.final.mode == "refit":
            # A refit final model trains anew: no stage reads the searches' fold models.
            space = dataclasses.replace(space, keep_checkpoints="none")
        return space

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """What stage ``stage``'s hash covers (resolved, defaults filled in, no study paths)."""
        if stage == "01_data":
            data = self.data.to_dict()
            data.pop("cache_dir")  # where the cache lives changes no result
            if self.data.manifest is not None:
                data["manifest"] = _portable(self.data.manifest, self.folder)
                data["manifest_sha256"] = _sha256(self.data.manifest)
            return data
        if stage == "02_splits":
            splits = self.splits.to_dict()
            if splits["near_duplicates"] == "off":
                # Left out of the hash when off, so splits recorded before the key existed
                # stay up to date.
                del splits["near_duplicates"]
            return splits
        if stage == "03_roi":
            roi = self.roi.resolved()
            weights = roi.get("train", {}).get("weights")
            if weights:
                roi["train"]["weights"] = _portable(weights, self.folder)
                roi["train"]["weights_sha256"] = _sha256(weights)
            return roi
        for key, name in STAGE_OF_SEARCH.items():
            if stage == name:
                return {
                    "space": self.search_space(key).source,
                    "base": self.base,
                    "debug": self.debug,
                }
        if stage == "07_aggregate":
            return self.aggregate.to_dict()
        if stage == "08_final":
            return self.final.to_dict()
        if stage == "09_report":
            return self.report.to_dict()
        return {}

    def to_dict(self, *, portable: bool = False) -> dict[str, Any]:
        """The resolved study (every default filled in). ``portable``: input paths relative to
        the study file's folder, as ``study.json`` records them."""
        out = {
            "name": self.name,
            "description": self.description,
            "data": self.data.to_dict(),
            "splits": self.splits.to_dict(),
            "roi": self.roi.to_dict(),
            "base": self.base,
            "searches": {k: s.to_dict() for k, s in self.searches.items()},
            "aggregate": self.aggregate.to_dict(),
            "final": self.final.to_dict(),
            "report": self.report.to_dict(),
            "tracking": self.tracking.to_dict(),
            "debug": self.debug,
        }
        if portable:
            paths = [(out["data"], "manifest"), (out["data"], "cache_dir")]
            paths += [(out["roi"]["train"], "weights")]
            paths += [(s, "file") for s in out["searches"].values()]
            for block, key in paths:
                if block.get(key):
                    block[key] = _portable(block[key], self.folder)
        return out


def _portable(path: str | os.PathLike, folder: Path) -> str:
    """``path`` relative to ``folder`` (the study file's), so a moved project hashes the same."""
    from breastfusion.io import relative_ref

    return relative_ref(path, folder)


def _sha256(path: str | os.PathLike) -> str:
    from breastfusion.io import sha256_file

    try:
        return sha256_file(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _resolve(value: Any, base: Path, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a file path, got {value!r}")
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _mapping(raw: Any, key: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key} must be a mapping of settings, got {raw!r}")
    return dict(raw)


# -- loading ------------------------------------------------------------------------------------


def load_study(path: str | os.PathLike) -> StudyConfig:
    """Read and validate a study file; every problem is a ``ConfigError`` naming the file and
    the full key, raised before any stage runs."""
    from breastfusion.config import read_yaml

    path = Path(path)
    raw = read_yaml(path, "study file")
    try:
        return parse_study(raw, path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", details=exc.details) from exc


def parse_study(raw: Any, path: Path) -> StudyConfig:
    """A study from its parsed YAML; ``path`` (the study file) anchors relative paths."""
    if not isinstance(raw, dict):
        raise ConfigError("a study file must be a mapping of sections (see jobs/demo.yaml)")
    _unknown(raw, list(_TOP), "")
    folder = path.parent
    for key in ("name", "description", "out"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{key} must be a string, got {raw[key]!r}")
    data = DataSettings.from_dict(_data_paths(_mapping(raw.get("data"), "data"), folder))
    splits = SplitSettings.from_dict(raw.get("splits"))
    roi = RoiSettings.from_dict(_roi_paths(_mapping(raw.get("roi"), "roi"), folder))
    report = ReportSettings.from_dict(raw.get("report"))
    final_raw = _mapping(raw.get("final"), "final")
    if report.gradcam_per_category is not None:
        final_raw.setdefault("gradcam_per_category", report.gradcam_per_category)
    study = StudyConfig(
        name=str(raw.get("name") or path.stem),
        description=str(raw.get("description") or ""),
        path=path,
        out=Path(_resolve(raw["out"], folder, "out")) if raw.get("out") else None,
        data=data,
        splits=splits,
        roi=roi,
        base=_mapping(raw.get("base"), "base"),
        searches={},
        aggregate=AggregateSettings.from_dict(raw.get("aggregate"), "aggregate"),
        final=FinalSettings.from_dict(final_raw, "final"),
        report=report,
        tracking=_tracking(TrackingSettings.from_dict(raw.get("tracking")), folder),
        raw=raw,
    )
    try:
        base = study.base_config()
    except ConfigError as exc:
        raise ConfigError(f"base: {exc.message}") from None
    searches = _searches(raw, folder, base, splits.folds)
    if not searches:
        raise ConfigError("the study runs no search: give backbones.dm, backbones.us or fusion")
    return dataclasses.replace(study, searches=searches)


def _tracking(tracking: TrackingSettings, folder: Path) -> TrackingSettings:
    """A relative SQLite store (``sqlite:///mlflow.db``) lives next to the study file."""
    uri = tracking.mlflow_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = (folder / uri[len("sqlite:///") :]).resolve()
        return dataclasses.replace(tracking, mlflow_uri=f"sqlite:///{path.as_posix()}")
    return tracking


def _data_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    for key in ("manifest", "cache_dir"):
        if data.get(key) is not None:
            data[key] = _resolve(data[key], folder, f"data.{key}")
    if "synthetic" in data and data["synthetic"] is None:
        data["synthetic"] = {}  # `synthetic:` with nothing under it: every default
    return data


def _roi_paths(roi: dict[str, Any], folder: Path) -> dict[str, Any]:
    train = roi.get("train")
    if isinstance(train, dict):
        weights = train.get("weights")
        if isinstance(weights, str) and weights.strip().lower() not in ("", "none"):
            roi["train"] = {**train, "weights": _resolve(weights, folder, "roi.train.weights")}
    return roi


def _searches(raw: dict[str, Any], folder: Path, base: Config, folds: int) -> dict[str, SearchRef]:
    """Every search space loads and fits the base config before the first stage runs."""
    from breastfusion.distributed.space import load_space, parse_space, validate_against_config

    backbones = _mapping(raw.get("backbones"), "backbones")
    _unknown(backbones, ["dm", "us"], "backbones")
    given = [(k, f"backbones.{k}", backbones.get(k)) for k in ("dm", "us")]
    given.append(("fusion", "fusion", raw.get("fusion")))
    refs: dict[str, SearchRef] = {}
    for key, where, value in given:
        if value is None:
            continue
        file = None
        if isinstance(value, str):
            file = _resolve(value, folder, where)
            space = load_space(file)  # its errors name the file
        elif isinstance(value, dict):
            try:
                space = parse_space(value, default_name=where.replace(".", "_"))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc.message}") from None
        else:
            raise ConfigError(f"{where} must be a search-space file or a mapping, got {value!r}")
        try:
            validate_against_config(space, base)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        expected = space.source.get("folds")
        if expected is not None and int(expected) != folds:
            raise ConfigError(
                f"{where}: the search space asks for {expected} folds but splits.folds is {folds}"
            )
        refs[key] = SearchRef(key, STAGE_OF_SEARCH[key], file, space)
    return refs
