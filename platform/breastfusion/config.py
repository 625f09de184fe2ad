"""Typed, validated training configuration: the only place YAML becomes objects.

A configuration is a tree of frozen dataclasses (``Config`` → ``data``, ``augment``, ``model``,
``optim``, ``train``). Hyperparameters are data: the search applies sampled values with
``cfg.with_overrides({"optim.lr": 3e-4})`` and every result is written next to
``cfg.to_dict()`` and ``cfg.config_hash()``. Validation happens once, in ``from_dict``, so code
downstream can trust every field (types, ranges, known backbone names, sizes a backbone can
take). This module stays light: no torch at import time (``breastfusion --help`` imports it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from breastfusion.errors import ConfigError
from breastfusion.io import sha256_json

Modality = Literal["dm", "us", "fusion"]

# Path-valued fields: ``load_yaml`` resolves relative values against the YAML file's folder,
# so a config file can live next to its data and still work from any working directory.
_PATH_KEYS = ("data.manifest", "data.splits", "data.cache_dir")
# ``model.pretrained`` is a path unless it is one of these keywords.
PRETRAINED_KEYWORDS = ("none", "imagenet")


def _f(default: Any, **bounds: float) -> Any:
    """A dataclass field with numeric bounds (``ge``, ``gt``, ``le``, ``lt``) checked at load."""
    return field(default=default, metadata=bounds)


@dataclass(frozen=True)
class DataConfig:
    """Where the cohort is, which fold to train, and how images are prepared."""

    manifest: str | None = None
    splits: str | None = None
    fold: int = _f(0, ge=0)
    modality: Modality = "fusion"
    # The study quotes 1024/512 px (ambiguously); 224 is the backbones' native size and keeps
    # a CPU run feasible. The search varies these.
    size_dm: int = _f(224, ge=8, le=4096)
    size_us: int = _f(224, ge=8, le=4096)
    # pad: keep the aspect ratio (pad to a square, centred, zero grey), for both modalities:
    # a US lesion's taller-than-wide shape is BI-RADS evidence that squashing would erase.
    # squash: stretch to a square (an option, not the default).
    resize: Literal["pad", "squash"] = "pad"
    # Fusion only: at most this many (DM, US) pairs per patient per epoch, drawn afresh each
    # epoch so that every pair is seen over the epochs; None = every pair every epoch (the
    # study's full cross-combination), whose epoch cost grows with images per patient squared.
    pairs_per_patient: int | None = _f(None, ge=1, le=10_000)
    # None: a ``.cache`` folder next to the manifest (shared by every run on that cohort).
    cache_dir: str | None = None
    # Loader worker processes; None = auto (none on <= 2 cores, where they steal the model's).
    num_workers: int | None = _f(None, ge=0, le=64)
    # Allow image paths (absolute, or symlinks) that leave the manifest's folder.
    allow_outside: bool = False
    # Debug: keep at most this many patients per split (both classes kept); None = all.
    max_patients: int | None = _f(None, ge=2)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation and malignant oversampling (the study's class balancing)."""

    hflip: float = _f(0.5, ge=0.0, le=1.0)
    vflip: float = _f(0.5, ge=0.0, le=1.0)
    elastic: float = _f(0.25, ge=0.0, le=1.0)
    # Scales the elastic deformation's magnitude; 0 turns the deformation into a no-op.
    strength: float = _f(1.0, ge=0.0, le=10.0)
    oversample: Literal["none", "sampler", "replicate"] = "sampler"


@dataclass(frozen=True)
class ModelConfig:
    """Backbone per branch and fusion head; defaults are the study's dual ResNet-18, sum fusion."""

    backbone_dm: str = "resnet18"
    backbone_us: str = "resnet18"
    fusion: str = "sum"
    # The study starts from ImageNet weights; "none" is the default because this platform must
    # run offline out of the box (``imagenet`` needs internet or a filled TORCH_HOME cache).
    pretrained: str = "none"
    input_mode: Literal["replicate", "adapt"] = "replicate"
    dropout: float = _f(0.0, ge=0.0, lt=1.0)
    # True: a data.size_* below a backbone's minimum (Inception v3: 75 px) is accepted and
    # the backbone enlarges its input to that minimum (bilinear) -- e.g. to compare six
    # backbones at one small size. False: such a size is refused.
    upsample_small: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and stopping: the study trains with Adam at lr 1e-4, batch 8."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = _f(1e-4, gt=0.0, le=10.0)
    weight_decay: float = _f(0.0, ge=0.0, le=1.0)
    momentum: float = _f(0.9, ge=0.0, lt=1.0)  # SGD only
    batch_size: int = _f(8, ge=1, le=4096)
    epochs: int = _f(200, ge=1, le=100_000)
    schedule: Literal["none", "cosine"] = "none"
    # Linear learning-rate warm-up over the first N epochs (per step, may be fractional):
    # Adam's first full-size steps can kill a plain deep net from scratch (VGG16's ReLUs die
    # and every patient gets the prior). 0 = off.
    warmup_epochs: float = _f(0.0, ge=0.0, le=1000.0)
    # Early stopping: stop after this many epochs without a better patient-level AUC on an
    # inner split of the training fold (``inner_val_fraction`` of its patients, stratified),
    # and keep that epoch's weights; the fold's own validation patients are never used to
    # pick an epoch. 0 = train every epoch on the whole training fold and keep the last one.
    patience: int = _f(20, ge=0)
    inner_val_fraction: float = _f(0.2, gt=0.0, lt=0.9)
    seed: int = _f(0, ge=0)


@dataclass(frozen=True)
class TrainConfig:
    """Where and how the loop runs; none of it changes what is learnt (except AMP rounding)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # GPU only: bf16 where supported, else fp16 with a GradScaler
    channels_last: bool = True  # GPU only
    # Operating point (a probability) for sensitivity/specificity/precision/accuracy in a
    # fold's metrics.json; applied to the calibrated scores (log-odds logit(threshold)).
    threshold: float = _f(0.5, gt=0.0, lt=1.0)
    # Precise BN: after every training epoch, recompute BatchNorm running statistics over up
    # to this many training batches (no gradient step) so eval-mode scores match the weights.
    # 0 = off (then a few-step model can give constant or saturated eval-mode logits).
    bn_recalibration_batches: int = _f(32, ge=0, le=100_000)
    # Score the monitoring patients every N epochs and always after the last one (curves and
    # early stopping need every epoch: with optim.patience > 0 or a Tune scheduler keep 1).
    validate_every: int = _f(1, ge=1, le=100_000)


@dataclass(frozen=True)
class Config:
    """One training run (one fold) fully described; see the module docstring."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Config:
        """Build and validate a config from plain data; missing keys take defaults."""
        return from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of ``to_dict()`` (sorted keys): stable across runs."""
        return sha256_json(self.to_dict())

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A new validated config with dotted keys replaced, e.g. ``{"optim.lr": 1e-3}``."""
        return with_overrides(self, overrides)

    # -- convenience ----------------------------------------------------------------------
    @property
    def branches(self) -> tuple[str, ...]:
        """The modalities this run feeds to the model ("dm", "us" or both)."""
        return ("dm", "us") if self.data.modality == "fusion" else (self.data.modality,)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}
# Informational keys a written config.yaml carries; ignored (recomputed) when read back.
_INFO_KEYS = ("config_hash",)


def from_dict(raw: dict[str, Any] | None) -> Config:
    """Validate ``raw`` strictly (unknown keys, types, ranges, names, sizes) into a ``Config``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(k for k in raw if k not in _SECTIONS and k not in _INFO_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown config section {unknown[0]!r}; known sections: {', '.join(_SECTIONS)}"
        )
    sections = {
        name: _build_section(name, section_type, raw.get(name))
        for name, section_type in _SECTIONS.items()
    }
    cfg = Config(**sections)
    _check_models(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted-key overrides to ``cfg`` and validate the result as a whole."""
    raw = cfg.to_dict()
    for key, value in overrides.items():
        section, _, name = str(key).partition(".")
        if section not in _SECTIONS or not name:
            raise ConfigError(
                f"unknown config key {key!r}; keys look like 'section.name' with sections "
                f"{', '.join(_SECTIONS)}"
            )
        known = _field_names(_SECTIONS[section])
        if name not in known:
            raise ConfigError(
                f"unknown config key {key!r}; known keys in {section!r}: {', '.join(known)}"
            )
        raw[section][name] = copy.deepcopy(value)
    return from_dict(raw)


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse a YAML file; an unreadable or malformed file is a ``ConfigError`` naming it
    (``what`` says which kind of file: "config file", "search space", "study file")."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc


def load_yaml(path: str | Path) -> Config:
    """Read a YAML config; relative paths in it are taken relative to the file's folder."""
    path = Path(path)
    raw = read_yaml(path, "config file")
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    raw = _resolve_paths(copy.deepcopy(raw or {}), path.resolve().parent)
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", details=exc.details) from exc


def dump_yaml(cfg: Config, folder: str | Path | None = None) -> str:
    """The resolved config as YAML, with its hash as an informational top-level key. With
    ``folder`` (where the YAML will live), its paths are written relative to that folder."""
    import yaml

    raw = cfg.to_dict()
    if folder is not None:
        raw = portable_paths(raw, Path(folder))
    doc = {"config_hash": cfg.config_hash(), **raw}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def save_yaml(cfg: Config, path: str | Path) -> Path:
    """Write ``dump_yaml(cfg)`` atomically, its paths relative to the file's folder (so a moved
    study or bundle still reads: ``load_yaml`` resolves them against the new place)."""
    from breastfusion.io import atomic_write_text

    return atomic_write_text(path, dump_yaml(cfg, Path(path).resolve().parent))


# -- validation internals ------------------------------------------------------------------


def _field_names(section_type: type) -> list[str]:
    return [f.name for f in dataclasses.fields(section_type)]


def _build_section(name: str, section_type: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {type(raw).__name__}")
    known = _field_names(section_type)
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"unknown config key '{name}.{key}'; known keys in {name!r}: {', '.join(known)}"
            )
    hints = typing.get_type_hints(section_type)
    values = {}
    for f in dataclasses.fields(section_type):
        if f.name in raw:
            dotted = f"{name}.{f.name}"
            value = _coerce(raw[f.name], hints[f.name], dotted)
            _check_bounds(value, f.metadata, dotted)
            values[f.name] = value
    return section_type(**values)


def _type_label(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_label(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it as a plain Python value.

    Lenient only where YAML and search libraries force it: ints for floats, numpy scalars,
    and strings like "1e-4" (YAML 1.1 reads an exponent without a dot as a string).
    """
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            try:
                return _coerce(value, inner[0], key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_label(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if float(value).is_integer():
                return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, Path):
            return str(value)
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")  # programming error


def _check_bounds(value: Any, bounds: Any, key: str) -> None:
    if value is None or not bounds:
        return
    checks = {
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<"),
    }
    for name, bound in bounds.items():
        ok, symbol = checks[name]
        if not ok(value, bound):
            raise ConfigError(f"{key}: {value!r} is out of range (must be {symbol} {bound})")


def _check_models(cfg: Config) -> None:
    """Backbone and head names must be registered; used branches' sizes must fit the backbone."""
    from breastfusion.models.registry import backbone_names, fusion_names, min_input_size

    known = list(backbone_names())
    for key in ("backbone_dm", "backbone_us"):
        name = getattr(cfg.model, key)
        if name not in known:
            raise ConfigError(
                f"model.{key}: unknown backbone {name!r}; known backbones: {', '.join(known)}"
            )
    heads = list(fusion_names())
    if cfg.model.fusion not in heads:
        raise ConfigError(
            f"model.fusion: unknown fusion head {cfg.model.fusion!r}; known fusion heads: "
            f"{', '.join(heads)}"
        )
    for branch in cfg.branches:
        backbone = getattr(cfg.model, f"backbone_{branch}")
        size = getattr(cfg.data, f"size_{branch}")
        minimum = min_input_size(backbone)
        if size < minimum and not cfg.model.upsample_small:
            raise ConfigError(
                f"data.size_{branch}: {size} px is below the minimum input size of "
                f"{backbone} ({minimum} px); set model.upsample_small: true to let the "
                "backbone enlarge smaller inputs"
            )


def _path_keys(raw: dict[str, Any]) -> list[str]:
    keys = [*_PATH_KEYS]
    model = raw.get("model")
    if isinstance(model, dict) and model.get("pretrained") not in (None, *PRETRAINED_KEYWORDS):
        keys.append("model.pretrained")
    return keys


def _map_paths(raw: dict[str, Any], fn: Any) -> dict[str, Any]:
    """``raw`` with ``fn(Path)`` applied to each path value (``_path_keys``), in place."""
    for dotted in _path_keys(raw):
        section, name = dotted.split(".")
        block = raw.get(section)
        if isinstance(block, dict) and isinstance(block.get(name), str):
            block[name] = fn(Path(block[name]).expanduser())
    return raw


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    # lexical, the inverse of ``portable_paths``
    return _map_paths(raw, lambda p: str(p) if p.is_absolute() else os.path.normpath(base / p))


def resolve_paths(raw: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """A copy of a raw config mapping (e.g. a saved ``config.yaml``) whose relative paths
    (``data.manifest``, ``data.splits``, ``data.cache_dir``, ``model.pretrained``) are resolved
    against ``base``, the folder of the file it came from."""
    return _resolve_paths(copy.deepcopy(raw), Path(base).resolve())


def portable_paths(raw: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """The inverse of ``resolve_paths``: a copy whose absolute paths are relative to ``base``
    (climbing with ``..`` if needed; absolute only where none exists, e.g. another drive)."""
    from breastfusion.io import relative_ref

    return _map_paths(
        copy.deepcopy(raw), lambda p: relative_ref(p, base) if p.is_absolute() else str(p)
    )
