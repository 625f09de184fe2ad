"""Name → builder registries for backbones and classifier heads.

This module is imported by config validation and the CLI, so it must not import torch. The
built-in entries are therefore registered as ``"module:attribute"`` strings that are only
imported when a builder is actually requested (``Registry.get``). Plain callables can be
registered too (plugins, tests).

Facts that configs need before anything is built (minimum input size, feature size) live
here as plain data, so ``min_input_size("inception_v3")`` works without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from breastfusion.errors import ConfigError

Builder = Callable[..., Any]


@dataclass(frozen=True)
class Entry:
    """One registered name: a builder (callable or lazy ``"module:attr"``) and metadata."""

    name: str
    target: Builder | str
    meta: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> Builder:
        """Return the builder callable, importing its module on first use."""
        if callable(self.target):
            return self.target
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


class Registry:
    """A small name → builder map.

    Registering a name twice raises (a silent override would make a config mean different
    things depending on import order); asking for an unknown name raises ``ConfigError``
    listing the known names, so a typo in a YAML file is a one-line fix.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, target: Builder | str | None = None, **meta: Any
    ) -> Callable[[Builder], Builder] | Builder | str:
        """Register ``target`` under ``name``; without ``target``, act as a decorator."""
        if target is None:

            def decorator(fn: Builder) -> Builder:
                self.register(name, fn, **meta)
                return fn

            return decorator
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if not callable(target) and not (isinstance(target, str) and ":" in target):
            raise TypeError(f"{self.kind} {name!r}: target must be callable or 'module:attr'")
        self._entries[name] = Entry(name, target, dict(meta))
        return target

    def entry(self, name: str) -> Entry:
        """The entry for ``name``; ``ConfigError`` listing the known names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names())
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def get(self, name: str) -> Builder:
        """The builder for ``name`` (imports its module if it was registered lazily)."""
        return self.entry(name).resolve()

    def meta(self, name: str) -> dict[str, Any]:
        """A copy of the metadata registered with ``name``."""
        return dict(self.entry(name).meta)

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


BACKBONES = Registry("backbone")
HEADS = Registry("head")

# Each backbone's facts in one entry (no torch needed to read them):
# min_size: the smallest height/width accepted. Measured on torchvision 0.29 (batch 2,
#   train and eval): ResNet/ResNeXt run down to 1 px, GoogLeNet to 15 px, VGG16 to 32 px,
#   Inception v3 to 75 px. We enforce max(measured, 32): 32 is the total stride of every
#   backbone, and below it the last stage sees only padding and Grad-CAM maps are 1×1.
# feature_dim: size of the pooled feature vector the backbone returns.
# params: parameters of the feature extractor (no classifier), counted on torchvision 0.29
#   with these builders (tests/test_models.py checks them); the best rule's tie-break.
# label: how tables and reports name it. Order = the study's tables.
for _name, _label, _min, _dim, _params in (
    ("resnet18", "ResNet-18", 32, 512, 11_176_512),
    ("resnet50", "ResNet-50", 32, 2048, 23_508_032),
    ("resnext50_32x4d", "ResNeXt-50", 32, 2048, 22_979_904),
    ("inception_v3", "Inception v3", 75, 2048, 21_785_568),
    ("vgg16", "VGG16", 32, 512, 14_714_688),
    ("googlenet", "GoogLeNet", 32, 1024, 5_599_904),
):
    BACKBONES.register(
        _name,
        f"breastfusion.models.backbones:{_name}",
        min_size=_min,
        feature_dim=_dim,
        label=_label,
        params=_params,
    )
del _name, _label, _min, _dim, _params

# inputs: 1 for the single-modal head, 2 for the (DM, US) late-fusion heads.
HEADS.register("single", "breastfusion.models.fusion:LinearHead", inputs=1)
HEADS.register("sum", "breastfusion.models.fusion:SumHead", inputs=2)
HEADS.register("concat", "breastfusion.models.fusion:ConcatHead", inputs=2)
HEADS.register("gated", "breastfusion.models.fusion:GatedHead", inputs=2)

INPUT_MODES = ("replicate", "adapt")


def backbone_names() -> list[str]:
    """Registered backbone names (no torch import)."""
    return BACKBONES.names()


def head_names() -> list[str]:
    """All registered head names, single-modal and fusion (no torch import)."""
    return HEADS.names()


def fusion_names() -> list[str]:
    """Head names usable for ``modality: fusion`` (two inputs)."""
    return [n for n in HEADS.names() if HEADS.meta(n).get("inputs") == 2]


def min_input_size(name: str) -> int:
    """Smallest height and width backbone ``name`` accepts (``ConfigError`` if unknown)."""
    return int(BACKBONES.meta(name)["min_size"])


def feature_dim(name: str) -> int:
    """Length of the pooled feature vector of backbone ``name``."""
    return int(BACKBONES.meta(name)["feature_dim"])


def backbone_label(name: str) -> str:
    """Display name of a backbone (``ResNet-18``); an unknown name is shown as given."""
    return str(BACKBONES.meta(name)["label"]) if name in BACKBONES else name


def backbone_params(name: str) -> int | None:
    """Feature-extractor parameter count of a backbone; None for an unknown name."""
    return int(BACKBONES.meta(name)["params"]) if name in BACKBONES else None


def check_input_size(name: str, height: int, width: int | None = None) -> None:
    """Raise ``ConfigError`` if an input of ``height``×``width`` is too small for ``name``.

    Configs call this before training so a bad size fails in seconds, not after a cache
    build; the backbone module repeats the check at run time.
    """
    width = height if width is None else width
    minimum = min_input_size(name)
    if height < minimum or width < minimum:
        raise ConfigError(
            f"input size {height}x{width} is too small for backbone {name!r}: "
            f"minimum is {minimum}x{minimum}"
        )
