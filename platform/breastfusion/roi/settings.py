"""Typed settings of the ROI stage: the study's defaults live here and nowhere else.

``DetectorTrainSettings`` is the study's ``roi.train`` block, ``CropSettings`` its
``roi.crop`` block. Both are frozen, validate themselves, and are built from a config
mapping with :meth:`from_dict`, which refuses unknown keys naming the full key and the
allowed ones. Error messages name config keys (``roi.crop.margin``), never command-line
flags: the CLI maps its flags onto these keys. Light module: no numpy, torch or ultralytics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from breastfusion.errors import ConfigError

FALLBACKS: tuple[str, ...] = ("centre", "whole", "drop")
# Above this share of US rows without a detected ROI the crop summary warns: the detector is
# probably not finding lesions and the "ROI" crops are mostly blind centre/whole crops.
FALLBACK_WARN_SHARE = 0.2

S = TypeVar("S", bound="_Settings")


def _number(key: str, value: Any, *, integer: bool) -> int | float:
    """``value`` as an int or float; refuses bools, strings and non-finite numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    return float(value)


class _Settings:
    """Shared ``from_dict``/``replace``/``to_dict``; subclasses are frozen dataclasses that
    define ``_coerce`` (types, per key) and ``_check`` (ranges, on a dict of all values)."""

    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._check(self.to_dict(), self.PREFIX)

    @classmethod
    def _coerce(cls, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
        return raw

    @classmethod
    def _check(cls, values: dict[str, Any], prefix: str) -> None:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[S], raw: Mapping[str, Any] | None, prefix: str | None = None) -> S:
        """Build from a config mapping (``None``: all defaults); errors name ``prefix.key``."""
        prefix = cls.PREFIX if prefix is None else prefix
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{prefix} must be a mapping of settings, got {raw!r}")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(str(k) for k in raw if k not in names)
        if unknown:
            which = ", ".join(f"{prefix}.{k}" for k in unknown)
            raise ConfigError(
                f"unknown setting {which}; allowed under {prefix}: {', '.join(names)}"
            )
        return cls().replace(prefix, **dict(raw))

    def replace(self: S, prefix: str | None = None, /, **changes: Any) -> S:
        """A validated copy with ``changes``; errors name ``prefix.key``."""
        prefix = self.PREFIX if prefix is None else prefix
        if not changes:
            return self
        values = {**self.to_dict(), **type(self)._coerce(dict(changes), prefix)}
        type(self)._check(values, prefix)
        return type(self)(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values at full precision."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class DetectorTrainSettings(_Settings):
    """How the YOLOv8 lesion detector is trained (study key ``roi.train``).

    ``weights``: ``None`` builds the network from ``yolov8n.yaml`` (random init, as the
    study); otherwise a local ``.pt`` file to fine-tune (never downloaded). ``val_fraction``:
    share of development patients held out to validate the detector. ``patience``: epochs
    without improvement before ultralytics stops early.
    """

    PREFIX: ClassVar[str] = "roi.train"

    epochs: int = 300
    imgsz: int = 640
    batch: int = 8
    seed: int = 0
    weights: str | None = None
    val_fraction: float = 0.2
    patience: int = 100

    @classmethod
    def _coerce(cls, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = dict(raw)
        for name in ("epochs", "imgsz", "batch", "seed", "patience"):
            if name in out:
                out[name] = _number(f"{prefix}.{name}", out[name], integer=True)
        if "val_fraction" in out:
            out["val_fraction"] = _number(
                f"{prefix}.val_fraction", out["val_fraction"], integer=False
            )
        if "weights" in out:
            w = out["weights"]
            if w is not None and not isinstance(w, str) and not hasattr(w, "__fspath__"):
                raise ConfigError(f"{prefix}.weights must be a file path or none, got {w!r}")
            w = None if w is None else str(w.__fspath__() if hasattr(w, "__fspath__") else w)
            out["weights"] = None if w is None or w.strip().lower() in {"", "none"} else w
        return out

    @classmethod
    def _check(cls, values: dict[str, Any], prefix: str) -> None:
        for name in ("epochs", "imgsz", "batch", "patience"):
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{prefix}.{name} must be an integer >= 1, got {value!r}")
        seed = values["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{prefix}.seed must be an integer >= 0, got {seed!r}")
        vf = values["val_fraction"]
        if isinstance(vf, bool) or not isinstance(vf, int | float) or not 0 < vf < 1:
            raise ConfigError(f"{prefix}.val_fraction must be in (0, 1), got {vf!r}")
        weights = values["weights"]
        if weights is not None and not isinstance(weights, str):
            raise ConfigError(f"{prefix}.weights must be a file path or none, got {weights!r}")


@dataclass(frozen=True)
class CropSettings(_Settings):
    """How a US image becomes its ROI crop (study key ``roi.crop``).

    ``margin``: context added on each side, as a fraction of the box's own width/height.
    ``fallback``: when nothing is detected, ``centre`` (the central ``centre_fraction`` of each
    side), ``whole`` (the whole image) or ``drop`` (leave the row out, warned). ``conf``/``iou``:
    the detector's confidence threshold and NMS IoU.
    """

    PREFIX: ClassVar[str] = "roi.crop"

    margin: float = 0.1
    fallback: str = "centre"
    conf: float = 0.25
    iou: float = 0.7
    centre_fraction: float = 0.6

    @classmethod
    def _coerce(cls, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = dict(raw)
        for name in ("margin", "conf", "iou", "centre_fraction"):
            if name in out:
                out[name] = _number(f"{prefix}.{name}", out[name], integer=False)
        if "fallback" in out and not isinstance(out["fallback"], str):
            raise ConfigError(
                f"{prefix}.fallback must be one of {', '.join(FALLBACKS)}, got {out['fallback']!r}"
            )
        return out

    @classmethod
    def _check(cls, values: dict[str, Any], prefix: str) -> None:
        fallback = values["fallback"]
        if fallback not in FALLBACKS:
            raise ConfigError(
                f"{prefix}.fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}"
            )
        for name, low, high, closed_low in (
            ("margin", 0.0, math.inf, True),
            ("conf", 0.0, 1.0, True),
            ("iou", 0.0, 1.0, True),
            ("centre_fraction", 0.0, 1.0, False),
        ):
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{prefix}.{name} must be a number, got {value!r}")
            ok = (value >= low if closed_low else value > low) and value <= high
            if not ok or not math.isfinite(value):
                left = "[" if closed_low else "("
                span = f">= {low:g}" if high == math.inf else f"in {left}{low:g}, {high:g}]"
                raise ConfigError(f"{prefix}.{name} must be {span}, got {value!r}")
