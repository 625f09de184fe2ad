"""The sections of a study file as typed settings: every study default lives here.

Each section is a frozen dataclass built by a strict ``from_dict(raw, prefix)`` that refuses
unknown keys naming the full key and the allowed ones (``data.synthetic.patiens`` → "unknown
setting data.synthetic.patiens; allowed under data.synthetic: patients, size, seed,
difficulty"), checks types and ranges, and names the key in every error. Sections other
areas own are theirs, embedded as they are: ``roi.train``/``roi.crop``
(``roi.settings.DetectorTrainSettings``/``CropSettings``), ``aggregate``
(``evaluate.settings.AggregateSettings``) and ``final`` (``final.settings.FinalSettings``).
Light module: no numpy, torch or Ray.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from breastfusion.errors import ConfigError
from breastfusion.evaluate.settings import AggregateSettings  # noqa: F401  (the study's)
from breastfusion.final.settings import FinalSettings  # noqa: F401  (the study's final:)
from breastfusion.roi.settings import CropSettings, DetectorTrainSettings

ROI_MODES = ("detect", "boxes", "none")


def _bound(default: Any, **bounds: float) -> Any:
    """A field with numeric bounds (``ge``, ``gt``, ``le``, ``lt``) checked at load."""
    return field(default=default, metadata=bounds)


def _unknown(raw: typing.Mapping[str, Any], allowed: list[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        which = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        where = f"under {prefix}" if prefix else "at the top level"
        raise ConfigError(f"unknown setting {which}; allowed {where}: {', '.join(allowed)}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (errors name ``key``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        return value
    if isinstance(tp, type) and hasattr(tp, "from_dict"):
        return tp.from_dict(value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and tp is int and isinstance(value, float):
            ok = value.is_integer()
        if not ok or not math.isfinite(value):
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(f"{key} must be {kind}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported settings type {tp!r} for {key}")  # pragma: no cover


def _check_bounds(key: str, value: Any, bounds: typing.Mapping[str, float]) -> None:
    if value is None or not bounds:
        return
    tests = {
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<"),
    }
    for name, bound in bounds.items():
        test, word = tests[name]
        if not test(value, bound):
            raise ConfigError(f"{key} must be {word} {bound:g}, got {value!r}")


class Section:
    """Strict ``from_dict``, ``to_dict`` and validated ``replace`` for a frozen dataclass."""

    PREFIX: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, raw: Any, prefix: str | None = None) -> Any:
        prefix = cls.PREFIX if prefix is None else prefix
        raw = {} if raw is None else raw
        if not isinstance(raw, typing.Mapping):
            raise ConfigError(f"{prefix} must be a mapping of settings, got {raw!r}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        _unknown(raw, [f.name for f in fields], prefix)
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields:
            if f.name not in raw:
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            values[f.name] = _coerce(key, raw[f.name], hints[f.name])
            _check_bounds(key, values[f.name], f.metadata)
        made = cls(**values)
        made._check(prefix)
        return made

    def _check(self, prefix: str) -> None:
        """Checks across fields (subclasses)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready values (nested sections as dicts), full precision."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out


@dataclass(frozen=True)
class SyntheticSettings(Section):
    """The built-in synthetic cohort (``breastfusion.data.synthetic.generate_cohort``)."""

    PREFIX: ClassVar[str] = "data.synthetic"

    patients: int = _bound(120, ge=10)
    size: int = _bound(128, ge=24, le=4096)
    seed: int = _bound(0, ge=0)
    difficulty: str = "standard"

    def _check(self, prefix: str) -> None:
        from breastfusion.data.synthetic.params import DIFFICULTIES

        if self.difficulty not in DIFFICULTIES:
            raise ConfigError(
                f"{prefix}.difficulty must be one of {', '.join(DIFFICULTIES)}, "
                f"got {self.difficulty!r}"
            )


@dataclass(frozen=True)
class DataSettings(Section):
    """Where the cohort comes from: ``manifest`` (a CSV) or ``synthetic`` (generated)."""

    PREFIX: ClassVar[str] = "data"

    manifest: str | None = None
    synthetic: SyntheticSettings | None = None
    check_images: bool = True
    allow_outside: bool = False
    # Where preprocessed images are cached; None: next to the manifest (the engine's default).
    cache_dir: str | None = None

    def _check(self, prefix: str) -> None:
        if (self.manifest is None) == (self.synthetic is None):
            raise ConfigError(
                f"{prefix} needs exactly one of {prefix}.manifest or {prefix}.synthetic"
            )


@dataclass(frozen=True)
class SplitSettings(Section):
    """Holdout fraction and patient-level K folds (``breastfusion.data.splits``)."""

    PREFIX: ClassVar[str] = "splits"

    folds: int = _bound(5, ge=2)
    holdout: float = _bound(0.2, ge=0.0, lt=1.0)
    seed: int = _bound(0, ge=0)
    # refuse: no splits while near-duplicate images belong to different patients (they would
    # leak between partitions), as ``breastfusion split --near-duplicates`` does.
    near_duplicates: Literal["off", "refuse"] = "off"

    @classmethod
    def from_dict(cls, raw: Any, prefix: str | None = None) -> Any:
        # YAML 1.1 reads a bare ``off``/``on`` as a boolean: take them as the words they are.
        if isinstance(raw, typing.Mapping) and isinstance(raw.get("near_duplicates"), bool):
            raw = {**raw, "near_duplicates": "refuse" if raw["near_duplicates"] else "off"}
        return super().from_dict(raw, prefix)


@dataclass(frozen=True)
class RoiSettings(Section):
    """US lesion ROI: ``detect`` (train YOLOv8, crop), ``boxes`` (manifest boxes), ``none``."""

    PREFIX: ClassVar[str] = "roi"

    mode: Literal["detect", "boxes", "none"] = "detect"
    train: DetectorTrainSettings = field(default_factory=DetectorTrainSettings)
    crop: CropSettings = field(default_factory=CropSettings)

    def resolved(self) -> dict[str, Any]:
        """What the ROI stage depends on: the detector settings only when it trains one."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode != "none":
            out["crop"] = self.crop.to_dict()
        if self.mode == "detect":
            out["train"] = self.train.to_dict()
        return out


@dataclass(frozen=True)
class ReportSettings(Section):
    """The HTML report: Grad-CAM overlays per category (made by the final stage) and the
    bootstrap resamples of its ROC bands."""

    PREFIX: ClassVar[str] = "report"

    # None: final.gradcam_per_category's default; a number fills final's when final sets none.
    gradcam_per_category: int | None = _bound(None, ge=0)
    bootstrap: int = _bound(1000, ge=100)


@dataclass(frozen=True)
class TrackingSettings(Section):
    """Experiment tracking: with ``mlflow_uri`` every search logs its trials there and the
    study logs its report and final model as artefacts of one MLflow run."""

    PREFIX: ClassVar[str] = "tracking"

    mlflow_uri: str | None = None
