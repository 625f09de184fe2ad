"""Search-space YAML → a validated ``SearchSpace`` (and, on demand, Ray Tune domains).

A search space is data, like a training config. Its file (see ``search_spaces/``) says what is
fixed, what is searched and how::

    name: fusion
    algorithm: optuna          # optuna | grid | random
    num_samples: 16            # trials (grid: repeats of the whole grid)
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}   # asha | median | none
    #   fold_pruning: true     stop a configuration between folds once it cannot end within
    #   fold_margin: 0.01      fold_margin of the best complete one (default: on unless none)
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}   # per trial; per worker when workers > 1
    workers: 1                    # > 1: each fold trains with Ray Train DDP
    max_failures: 2               # retries of a crashed trial
    keep_checkpoints: best        # best: fold models of the chosen (and tied) trials only; all;
                                  # none (a study's default when final.mode is refit)
    fold_parallel: false          # true: a trial trains its K folds at once (resources per fold)
    folds: 5                      # optional: must match the splits file
    fixed:                        # dotted config keys (see breastfusion.config)
      data.modality: fusion
      optim.epochs: 30
    space:
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
      optim.batch_size: {choice: [8, 16]}
      model.backbone_dm: {choice: [resnet18, resnet50]}
      augment.strength: {uniform: [0.5, 1.5]}

Every fixed value and every value a domain can produce is checked against
``breastfusion.config`` before any trial starts (unknown key, unknown backbone, empty range,
size below a backbone's minimum…). This module stays light: ray is imported only by
``to_tune()``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breastfusion.config import Config, read_yaml
from breastfusion.errors import ConfigError
from breastfusion.io import sha256_json

ALGORITHMS = ("optuna", "grid", "random")
SCHEDULERS = ("asha", "median", "none")
DOMAIN_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
KEEP_CHECKPOINTS = ("best", "all", "none")
_SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", "fold_pruning", "fold_margin")
_TOP_KEYS = (
    "name",
    "description",
    "algorithm",
    "num_samples",
    "scheduler",
    "max_concurrent_trials",
    "resources",
    "workers",
    "max_failures",
    "keep_checkpoints",
    "fold_parallel",
    "seed",
    "folds",
    "fixed",
    "space",
)


@dataclass(frozen=True)
class Domain:
    """One searched hyperparameter: a kind (see DOMAIN_KINDS) and its arguments."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def corners(self) -> list[Any]:
        """Values that bound what the domain can produce (used for validation)."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        if self.kind == "randint":  # Tune's randint excludes the upper bound
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def short(self, value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2g}"
        return str(value)


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    fold_pruning: bool = True  # see distributed.objective.fold_pruning_verdict
    fold_margin: float = 0.01


@dataclass(frozen=True)
class SearchSpace:
    name: str
    algorithm: str
    num_samples: int
    scheduler: SchedulerSpec
    max_concurrent_trials: int | None
    resources: dict[str, float]
    workers: int
    max_failures: int
    seed: int
    fixed: dict[str, Any]
    domains: tuple[Domain, ...]
    source: dict[str, Any] = field(repr=False, default_factory=dict)
    keep_checkpoints: str = "best"
    fold_parallel: bool = False

    @property
    def searched_keys(self) -> list[str]:
        return [d.key for d in self.domains]

    @property
    def total_trials(self) -> int:
        """How many trials the search runs (a grid: every point, ``num_samples`` times)."""
        points = math.prod(len(d.values) for d in self.domains if d.kind == "grid")
        return self.num_samples * points

    def fingerprint(self) -> str:
        return sha256_json(self.source)

    def to_tune(self) -> dict[str, Any]:
        """Ray Tune ``param_space``: one entry per searched key (dotted keys kept verbatim)."""
        from ray import tune

        makers = {
            "loguniform": lambda v: tune.loguniform(v[0], v[1]),
            "uniform": lambda v: tune.uniform(v[0], v[1]),
            "randint": lambda v: tune.randint(v[0], v[1]),
            "choice": lambda v: tune.choice(list(v)),
            "grid": lambda v: tune.grid_search(list(v)),
        }
        return {d.key: makers[d.kind](d.values) for d in self.domains}

    def for_debug(self, *, epochs: int = 1, max_patients: int = 24, size: int = 32) -> SearchSpace:
        """The same search, shrunk to minutes on a CPU: 1 epoch, few patients, small images,
        no pretrained weights (nothing to download), at most two trials (the first grid
        domain keeps its first two values, any other grid its first value)."""
        fixed = dict(self.fixed)
        fixed["optim.epochs"] = epochs
        fixed["data.max_patients"] = max_patients
        fixed["data.num_workers"] = 0
        fixed["model.pretrained"] = "none"
        domains = []
        grids = 0
        for d in self.domains:
            if d.key in ("data.size_dm", "data.size_us"):
                continue  # replaced by a fixed debug size below
            if d.kind == "grid":
                d = Domain(d.key, "grid", d.values[: 2 if grids == 0 else 1])
                grids += 1
            domains.append(d)
        base = Config().with_overrides({k: v for k, v in fixed.items() if k != "data.fold"})
        for key in ("data.size_dm", "data.size_us"):
            fixed[key] = max(size, _min_size_for(key, base, self))
        num_samples = 1 if any(d.kind == "grid" for d in domains) else min(self.num_samples, 2)
        return SearchSpace(
            name=f"{self.name}-debug",
            algorithm=self.algorithm,
            num_samples=num_samples,
            scheduler=self.scheduler,
            max_concurrent_trials=self.max_concurrent_trials,
            resources=self.resources,
            workers=self.workers,
            max_failures=self.max_failures,
            seed=self.seed,
            fixed=fixed,
            domains=tuple(domains),
            source={**self.source, "debug": True},
            keep_checkpoints=self.keep_checkpoints,
            fold_parallel=self.fold_parallel,
        )

    def base_config(self, base: Config | None = None) -> Config:
        """``base`` (or the defaults) with the space's fixed values applied."""
        return (base or Config()).with_overrides(self.fixed)


def _min_size_for(key: str, base: Config, space: SearchSpace) -> int:
    """Largest minimum input size among backbones this space can put on a size key's branch."""
    from breastfusion.models.registry import min_input_size

    branch = key.rsplit("_", 1)[1]
    backbone_key = f"model.backbone_{branch}"
    names = {getattr(base.model, f"backbone_{branch}")}
    for d in space.domains:
        if d.key == backbone_key:
            names.update(d.values)
    return max(min_input_size(n) for n in names)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file (see the module docstring)."""
    path = Path(path)
    raw = read_yaml(path, "search space")
    try:
        return parse_space(raw, default_name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", details=exc.details) from exc


def parse_space(raw: Any, *, default_name: str = "search") -> SearchSpace:
    if not isinstance(raw, dict):
        raise ConfigError("a search space must be a mapping (see search_spaces/*.yaml)")
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; known keys: {', '.join(_TOP_KEYS)}")
    algorithm = _one_of(raw.get("algorithm", "optuna"), ALGORITHMS, "algorithm")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError("'fixed' must map dotted config keys to values")
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise ConfigError("'space' must map dotted config keys to domains")
    domains = tuple(_parse_domain(k, v) for k, v in space_raw.items())
    overlap = sorted(set(fixed) & {d.key for d in domains})
    if overlap:
        raise ConfigError(f"{overlap[0]!r} is both fixed and searched")
    if "data.fold" in fixed or any(d.key == "data.fold" for d in domains):
        raise ConfigError("'data.fold' is set by the search (every trial runs every fold)")
    if algorithm == "optuna" and any(d.kind == "grid" for d in domains):
        raise ConfigError("'grid' domains need algorithm: grid (Optuna samples; use 'choice')")
    if algorithm == "grid" and any(d.kind != "grid" for d in domains):
        bad = next(d.key for d in domains if d.kind != "grid")
        raise ConfigError(f"algorithm grid needs every domain to be a 'grid' ({bad!r} is not)")
    scheduler = _parse_scheduler(raw.get("scheduler", {"type": "asha"}))
    resources = raw.get("resources") or {"cpu": 1, "gpu": 0}
    if not isinstance(resources, dict) or set(resources) - {"cpu", "gpu"}:
        raise ConfigError("'resources' must be {cpu: N, gpu: N}")
    resources = {k: float(resources.get(k, 0)) for k in ("cpu", "gpu")}
    if resources["cpu"] <= 0 or resources["gpu"] < 0:
        raise ConfigError("'resources': cpu must be > 0 and gpu >= 0")
    if "folds" in raw:
        _int(raw["folds"], "folds", 2)
    mct = raw.get("max_concurrent_trials")
    space = SearchSpace(
        name=str(raw.get("name") or default_name),
        algorithm=algorithm,
        num_samples=_int(raw.get("num_samples", 1), "num_samples", 1),
        scheduler=scheduler,
        max_concurrent_trials=None if mct is None else _int(mct, "max_concurrent_trials", 1),
        resources=resources,
        workers=_int(raw.get("workers", 1), "workers", 1),
        max_failures=_int(raw.get("max_failures", 2), "max_failures", 0),
        seed=_int(raw.get("seed", 0), "seed", 0),
        fixed=copy.deepcopy(fixed),
        domains=domains,
        source=copy.deepcopy(raw),
        keep_checkpoints=_one_of(
            raw.get("keep_checkpoints", "best"), KEEP_CHECKPOINTS, "keep_checkpoints"
        ),
        fold_parallel=_bool(raw.get("fold_parallel", False), "fold_parallel"),
    )
    every = fixed.get("train.validate_every", 1)
    if scheduler.type != "none" and isinstance(every, int) and every > 1:
        raise ConfigError(
            f"fixed train.validate_every: {every} leaves the {scheduler.type} scheduler "
            "without a score for most epochs; use scheduler: none or validate every epoch"
        )
    if space.fold_parallel and space.workers > 1:
        raise ConfigError(
            "fold_parallel: true trains each fold in one process; it needs workers: 1 "
            f"(got workers: {space.workers})"
        )
    validate_against_config(space)
    return space


def _parse_scheduler(raw: Any) -> SchedulerSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict) or set(raw) - set(_SCHEDULER_KEYS):
        unknown = sorted(set(raw) - set(_SCHEDULER_KEYS)) if isinstance(raw, dict) else []
        what = f"unknown key 'scheduler.{unknown[0]}'; " if unknown else ""
        raise ConfigError(f"{what}'scheduler' must be {{{', '.join(_SCHEDULER_KEYS)}}}")
    kind = _one_of(raw.get("type", "asha"), SCHEDULERS, "scheduler.type")
    margin = raw.get("fold_margin", SchedulerSpec.fold_margin)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1:
        raise ConfigError(f"scheduler.fold_margin: expected a number in [0, 1), got {margin!r}")
    return SchedulerSpec(
        type=kind,
        grace_period=_int(raw.get("grace_period", 1), "scheduler.grace_period", 1),
        reduction_factor=_int(raw.get("reduction_factor", 2), "scheduler.reduction_factor", 2),
        fold_pruning=_bool(raw.get("fold_pruning", kind != "none"), "scheduler.fold_pruning"),
        fold_margin=float(margin),
    )


def validate_against_config(space: SearchSpace, base: Config | None = None) -> None:
    """Every value the space can produce must make a valid config (checked before any trial)."""
    try:
        cfg = space.base_config(base)
    except ConfigError as exc:
        raise ConfigError(f"fixed: {exc.message}") from exc
    for d in space.domains:
        for value in d.corners():
            try:
                cfg.with_overrides({d.key: value})
            except ConfigError as exc:
                raise ConfigError(f"space.{d.key}: {exc.message}") from exc


def _parse_domain(key: Any, raw: Any) -> Domain:
    key = str(key)
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(
            f"space.{key}: a domain is one of {{{', '.join(DOMAIN_KINDS)}: [...]}}, got {raw!r}"
        )
    kind, values = next(iter(raw.items()))
    kind = _one_of(kind, DOMAIN_KINDS, f"space.{key}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"space.{key}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("choice", "grid"):
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"space.{key}: {kind} lists a value twice: {values!r}")
        return Domain(key, kind, tuple(values))
    if len(values) != 2:
        raise ConfigError(f"space.{key}: {kind} needs [low, high], got {values!r}")
    try:
        low, high = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"space.{key}: {kind} bounds must be numbers, got {values!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"space.{key}: empty range [{values[0]}, {values[1]}] (need low < high)")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"space.{key}: loguniform needs low > 0, got {values[0]}")
    if kind == "randint":
        if not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"space.{key}: randint bounds must be integers, got {values!r}")
        return Domain(key, kind, (int(low), int(high)))
    return Domain(key, kind, (low, high))


def _one_of(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}: expected true or false, got {value!r}")
    return value


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what}: expected an integer >= {minimum}, got {value!r}")
    return value
