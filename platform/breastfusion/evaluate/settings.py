"""Typed settings of the evaluation (holdout metrics) and of the aggregation (CV tables).

Both are frozen dataclasses built with a strict ``from_dict(raw, prefix)`` that refuses
unknown keys and names the full key in every error (``final.target_sensitivity``), never a
command-line flag: a CLI passes ``names`` to word the errors with its own flags instead.
Light module: no numpy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from breastfusion.errors import ConfigError

SCORE_SCALES = ("auto", "logit", "probability")
MODALITIES = ("dm", "us", "fusion")
MIN_BOOTSTRAP = 100  # fewer resamples make the 2.5th/97.5th percentiles mostly noise

T = TypeVar("T", bound="_Strict")


class _Strict:
    """``from_dict`` with unknown-key refusal; subclasses define ``_check(name_of)``."""

    PREFIX: ClassVar[str] = ""

    @classmethod
    def from_dict(
        cls: type[T],
        raw: Mapping[str, Any] | None,
        prefix: str | None = None,
        *,
        names: Mapping[str, str] | None = None,
    ) -> T:
        """Validated settings from a mapping (``None``: defaults). Errors name ``prefix.key``,
        or ``names[key]`` where given (a CLI's flag for that key)."""
        prefix = cls.PREFIX if prefix is None else prefix
        raw = dict(raw or {})
        fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(str(k) for k in raw if k not in fields)
        if unknown:
            which = ", ".join(_key(prefix, k) for k in unknown)
            raise ConfigError(
                f"unknown setting {which}; allowed: {', '.join(_key(prefix, f) for f in fields)}"
            )
        obj = cls(**raw)
        obj._check(lambda k: (names or {}).get(k) or _key(prefix, k))
        return obj

    def _check(self, name_of: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _finite(value: Any, key: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")


def _integer(value: Any, key: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")


def _choice(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class EvaluateSettings(_Strict):
    """How held-out predictions are evaluated.

    ``threshold``: a patient is called malignant when its score >= threshold; ``None`` = 0.5
    for probabilities, 0.0 for log-odds (the same cut). ``target_sensitivity``: choose the
    threshold on validation predictions instead. ``score_scale``: ``auto`` (probability when
    every score is in [0, 1], else log-odds), ``logit`` or ``probability``; it matters only
    for the Brier score, the reliability curve and the calibration slope/intercept.
    """

    PREFIX: ClassVar[str] = ""

    threshold: float | None = None
    target_sensitivity: float | None = None
    bootstrap: int = 2000
    seed: int = 0
    score_scale: str = "auto"

    def _check(self, name_of: Any) -> None:
        _finite(self.threshold, name_of("threshold"), optional=True)
        t = self.target_sensitivity
        if t is not None:
            _finite(t, name_of("target_sensitivity"))
            if not 0 < t <= 1:
                raise ConfigError(f"{name_of('target_sensitivity')} must be in (0, 1], got {t}")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int):
            raise ConfigError(f"{name_of('bootstrap')} must be an integer, got {self.bootstrap!r}")
        if self.bootstrap < MIN_BOOTSTRAP:
            raise ConfigError(
                f"{name_of('bootstrap')} must be at least {MIN_BOOTSTRAP}, got {self.bootstrap}"
            )
        _integer(self.seed, name_of("seed"), 0)
        _choice(self.score_scale, name_of("score_scale"), SCORE_SCALES)


@dataclass(frozen=True)
class AggregateSettings(_Strict):
    """How search folders become the CV tables and the chosen configuration.

    ``threshold``: the cut for sensitivity/specificity/... on the pooled calibrated OOF scores;
    ``None`` = the threshold the fold runs recorded (their ``metrics.json``), else 0.5 for
    probabilities / 0.0 for log-odds. ``best_from``: choose the overall best among one
    modality only. ``tie_tolerance``: see ``runs.selection_rule``.
    """

    PREFIX: ClassVar[str] = "aggregate"

    threshold: float | None = None
    bootstrap: int = 2000
    seed: int = 0
    tie_tolerance: float = 0.001
    best_from: str | None = None
    score_scale: str = "auto"

    def _check(self, name_of: Any) -> None:
        _finite(self.threshold, name_of("threshold"), optional=True)
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int):
            raise ConfigError(f"{name_of('bootstrap')} must be an integer, got {self.bootstrap!r}")
        if self.bootstrap < MIN_BOOTSTRAP:
            raise ConfigError(
                f"{name_of('bootstrap')} must be at least {MIN_BOOTSTRAP}, got {self.bootstrap}"
            )
        _integer(self.seed, name_of("seed"), 0)
        tol = self.tie_tolerance
        _finite(tol, name_of("tie_tolerance"))
        if not 0 <= tol < 0.5:
            raise ConfigError(f"{name_of('tie_tolerance')} must be in [0, 0.5), got {tol}")
        if self.best_from is not None:
            _choice(self.best_from, name_of("best_from"), MODALITIES)
        _choice(self.score_scale, name_of("score_scale"), SCORE_SCALES)
