"""The ``final:`` settings of a study (and ``breastfusion final``'s flags), typed and strict.

``FinalSettings.from_dict(raw, prefix="final")`` refuses unknown keys naming the full key
(``final.colour``) and the allowed ones, and checks every value's type and range, naming the
key. The study's typed config embeds this class; the CLI maps its flags onto these keys.
Light module: no torch, no pandas.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from breastfusion.errors import ConfigError

MODES = ("refit", "ensemble")
DEVICES = ("auto", "cpu", "cuda")
MIN_BOOTSTRAP = 100
# ``debug`` (a study's --debug) lowers these unless the study sets them.
DEBUG_DEFAULTS = {"bootstrap": 200, "gradcam_per_category": 1}


def _integer(key: str, value: Any, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


@dataclass(frozen=True)
class FinalSettings:
    """How the chosen configuration becomes the exported model.

    ``mode``: ``refit`` (train afresh on every development patient) or ``ensemble`` (the
    search's fold models, each with its own calibration). ``target_sensitivity``: choose the
    operating point on the pooled calibrated out-of-fold scores (None: ``train.threshold``).
    ``epochs``: refit epochs (None: from the folds, see ``final.members.refit_epochs``).
    ``gradcam_per_category``: holdout patients per category (TP, FN, FP) in the Grad-CAM
    gallery (0: none). ``bootstrap``/``seed``: holdout AUC bootstrap. ``device``: where to
    train and score (None: the config's ``train.device``). ``keep_patient_ids``: put patient
    ids into the bundle's metadata (default: counts only). ``onnx``: export ``model.onnx``.
    """

    mode: str = "refit"
    target_sensitivity: float | None = None
    epochs: int | None = None
    gradcam_per_category: int = 3
    bootstrap: int = 2000
    seed: int = 0
    device: str | None = None
    keep_patient_ids: bool = False
    onnx: bool = True

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any] | None, prefix: str = "final", *, debug: bool = False
    ) -> FinalSettings:
        """Build and check from a config mapping (None: defaults); errors name ``prefix.key``."""
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{prefix} must be a mapping of settings, got {raw!r}")
        unknown = sorted(str(k) for k in raw if k not in cls.keys())
        if unknown:
            which = ", ".join(f"{prefix}.{k}" for k in unknown)
            raise ConfigError(
                f"unknown setting {which}; allowed under {prefix}: {', '.join(cls.keys())}"
            )
        values = {**(DEBUG_DEFAULTS if debug else {}), **dict(raw)}
        if isinstance(values.get("target_sensitivity"), int) and not isinstance(
            values.get("target_sensitivity"), bool
        ):
            values["target_sensitivity"] = float(values["target_sensitivity"])
        settings = cls(**values)
        settings.check(prefix)
        return settings

    def check(self, prefix: str = "final") -> None:
        """Raise ``ConfigError`` naming ``prefix.key`` for the first invalid value."""
        if self.mode not in MODES:
            raise ConfigError(f"{prefix}.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        t = self.target_sensitivity
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, float) or not math.isfinite(t):
                raise ConfigError(f"{prefix}.target_sensitivity must be a number, got {t!r}")
            if not 0 < t <= 1:
                raise ConfigError(f"{prefix}.target_sensitivity must be in (0, 1], got {t!r}")
        _integer(f"{prefix}.epochs", self.epochs, 1, optional=True)
        _integer(f"{prefix}.gradcam_per_category", self.gradcam_per_category, 0)
        _integer(f"{prefix}.bootstrap", self.bootstrap, MIN_BOOTSTRAP)
        _integer(f"{prefix}.seed", self.seed, 0)
        d = self.device
        if d is not None and (
            not isinstance(d, str) or not (d in DEVICES or d.startswith("cuda:"))
        ):
            raise ConfigError(
                f"{prefix}.device must be one of {', '.join(DEVICES)} (or cuda:N) or none, "
                f"got {d!r}"
            )
        for name in ("keep_patient_ids", "onnx"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{prefix}.{name} must be true or false, got {getattr(self, name)!r}"
                )

    def replace(self, prefix: str = "final", **changes: Any) -> FinalSettings:
        """A checked copy with ``changes`` (None values are ignored: "not given")."""
        given = {k: v for k, v in changes.items() if v is not None}
        return FinalSettings.from_dict({**self.to_dict(), **given}, prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
