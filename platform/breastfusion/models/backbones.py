"""torchvision backbones as pooled-feature extractors that take one grey channel in [0, 1].

Every backbone is a :class:`Backbone`: an input stem followed by the torchvision trunk up to
and including global average pooling (no dropout, no classifier), mapping (B, C, H, W) to
(B, feature_dim). The stem does the normalisation, so a saved or exported model takes the
dataset's [0, 1] grey tensors directly and nothing outside the model needs to know
ImageNet statistics.

Input stems (``input_mode``):

- ``replicate`` (the study): the grey channel is broadcast to three channels and normalised
  per channel with the statistics the pretrained weights were trained with. Broadcasting
  ``(B, 1, H, W) - mean(1, 3, 1, 1)`` replicates for free (no copy, traceable, and a
  3-channel input also works).
- ``adapt``: the first convolution takes one channel; its kernel is the sum of the RGB
  kernels (exact for a grey image replicated to RGB up to the per-channel std; for random
  init the sum of three kaiming kernels has the same variance as a 1-channel kaiming
  kernel), and the input is normalised with the mean of the three channel means and stds.

Normalisation: ResNet/ResNeXt/VGG weights expect ImageNet mean/std. torchvision's Inception
v3 and GoogLeNet weights were trained on inputs scaled to [-1, 1] and torchvision converts
ImageNet-normalised inputs back with ``transform_input=True``. We build them with
``transform_input=False`` and let the stem normalise with mean = std = 0.5, which is the same
arithmetic done once.

Auxiliary heads: Inception v3 and GoogLeNet are built with ``aux_logits=False`` and the
trunk is an explicit ``nn.Sequential`` of their feature layers, so training and eval behave
the same (a plain tensor out, no ``InceptionOutputs``/``GoogLeNetOutputs`` tuple in training
or under TorchScript) and the aux weights in pretrained files are dropped on load. The aux
losses helped train these nets from scratch on ImageNet; for fine-tuning a feature extractor
behind our own head they are unused parameters (and break DDP's unused-parameter check).

VGG16: ``features`` followed by global average pooling → 512 features. The 7×7 adaptive
pool + 4096-d MLP (≈120 M parameters, 25088×4096 in the first layer) would dwarf the rest of
the model, would fix the meaning of the input size, and is replaced by our head anyway;
global pooling matches the other backbones and works for any input ≥ 32 px.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from breastfusion.errors import ConfigError
from breastfusion.models.registry import BACKBONES, INPUT_MODES, feature_dim, min_input_size

log = logging.getLogger(__name__)

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class _Spec:
    """How to cut a torchvision model into a trunk, and where its special layers are."""

    layers: tuple[str, ...]  # child modules of the torchvision model, in forward order
    first_conv: str  # path of the first convolution (replaced in ``adapt`` mode)
    target_layer: str  # Grad-CAM layer: last conv block, path inside the trunk
    drop_prefixes: tuple[str, ...]  # classifier / aux keys dropped from pretrained files
    norm: tuple[tuple[float, ...], tuple[float, ...]]
    kwargs: tuple[tuple[str, Any], ...] = ()  # extra torchvision builder arguments


_RESNET = _Spec(
    layers=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"),
    first_conv="conv1",
    target_layer="layer4",
    drop_prefixes=("fc.",),
    norm=_IMAGENET,
)
_SPECS: dict[str, _Spec] = {
    "resnet18": _RESNET,
    "resnet50": _RESNET,
    "resnext50_32x4d": _RESNET,
    "inception_v3": _Spec(
        layers=(
            "Conv2d_1a_3x3",
            "Conv2d_2a_3x3",
            "Conv2d_2b_3x3",
            "maxpool1",
            "Conv2d_3b_1x1",
            "Conv2d_4a_3x3",
            "maxpool2",
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
            "avgpool",
        ),  # fmt: skip
        first_conv="Conv2d_1a_3x3.conv",
        target_layer="Mixed_7c",
        drop_prefixes=("fc.", "AuxLogits."),
        norm=_HALF,
        kwargs=(("aux_logits", False), ("transform_input", False)),
    ),
    "vgg16": _Spec(
        layers=("features",),
        first_conv="features.0",
        target_layer="features.29",  # ReLU after the last conv (14×14 at 224 px, before pool)
        drop_prefixes=("classifier.",),
        norm=_IMAGENET,
    ),
    "googlenet": _Spec(
        layers=(
            "conv1",
            "maxpool1",
            "conv2",
            "conv3",
            "maxpool2",
            "inception3a",
            "inception3b",
            "maxpool3",
            "inception4a",
            "inception4b",
            "inception4c",
            "inception4d",
            "inception4e",
            "maxpool4",
            "inception5a",
            "inception5b",
            "avgpool",
        ),  # fmt: skip
        first_conv="conv1.conv",
        target_layer="inception5b",
        drop_prefixes=("fc.", "aux1.", "aux2."),
        norm=_HALF,
        kwargs=(("aux_logits", False), ("transform_input", False)),
    ),
}


class InputStem(nn.Module):
    """Normalise a [0, 1] input: ``(x - mean) / std`` with (1, C, 1, 1) buffers.

    With three-channel statistics a one-channel input is broadcast to three channels, which
    is the study's grey → RGB replication without materialising a copy first.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Backbone(nn.Module):
    """Stem + torchvision trunk → (B, feature_dim) pooled features.

    Attributes ``name``, ``feature_dim``, ``min_size``, ``input_mode`` and
    ``target_layer_name`` describe it; ``gradcam_target_layer()`` returns the last conv
    block for Grad-CAM.
    """

    def __init__(
        self,
        name: str,
        stem: nn.Module,
        trunk: nn.Sequential,
        feature_dim: int,
        min_size: int,
        input_mode: str,
        target_layer_name: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.stem = stem
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.min_size = min_size
        self.input_mode = input_mode
        self.target_layer_name = target_layer_name
        # model.upsample_small: inputs below min_size are enlarged (bilinear) to it inside the
        # model instead of refused, so one input size serves every backbone of a comparison.
        self.upsample_small = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample_small:
            height, width = x.shape[-2], x.shape[-1]
            if height < self.min_size or width < self.min_size:
                size = (max(height, self.min_size), max(width, self.min_size))
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        # The size check is Python-side only: scripted or traced graphs keep the shapes
        # they were made with, and a clear message matters at training time.
        elif not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_size(x)
        return self.trunk(self.stem(x))

    @torch.jit.unused
    def _check_size(self, x: torch.Tensor) -> None:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if height < self.min_size or width < self.min_size:
            raise ConfigError(
                f"input size {height}x{width} is too small for backbone {self.name!r}: "
                f"minimum is {self.min_size}x{self.min_size}"
            )

    def gradcam_target_layer(self) -> nn.Module:
        """The module whose activations Grad-CAM should use (last conv block)."""
        return self.trunk.get_submodule(self.target_layer_name)


def build_backbone(
    name: str,
    pretrained: str | Path = "none",
    input_mode: str = "replicate",
    *,
    in_channels: int | None = None,
) -> tuple[Backbone, int]:
    """Build backbone ``name`` → ``(module, feature_dim)``.

    ``pretrained``: ``"none"`` (random init), ``"imagenet"`` (torchvision's IMAGENET1K_V1
    weights via its weights API / ``$TORCH_HOME`` cache) or a path to a local torchvision
    state dict. ``input_mode``: ``"replicate"`` or ``"adapt"`` (see module docstring).
    ``in_channels`` (CONTRIBUTING's signature) is accepted for compatibility: the replicate
    stem takes 1 or 3 channels alike; ``adapt`` takes exactly 1.
    """
    builder = BACKBONES.get(name)
    return builder(pretrained=pretrained, input_mode=input_mode, in_channels=in_channels)


def _make_builder(name: str):
    def builder(
        pretrained: str | Path = "none",
        input_mode: str = "replicate",
        in_channels: int | None = None,
    ) -> tuple[Backbone, int]:
        return _build(name, pretrained, input_mode, in_channels)

    builder.__name__ = name
    builder.__doc__ = f"Build the {name} backbone; see :func:`build_backbone`."
    return builder


def _build(
    name: str, pretrained: str | Path, input_mode: str, in_channels: int | None
) -> tuple[Backbone, int]:
    import torchvision.models as tvm

    spec = _SPECS[name]
    if input_mode not in INPUT_MODES:
        raise ConfigError(f"unknown input_mode {input_mode!r}; known: {', '.join(INPUT_MODES)}")
    allowed = (1,) if input_mode == "adapt" else (1, 3)
    if in_channels is not None and in_channels not in allowed:
        raise ConfigError(
            f"backbone {name!r} with input_mode {input_mode!r} takes {allowed} input "
            f"channels, not {in_channels}"
        )

    kwargs = dict(spec.kwargs)
    if "aux_logits" in kwargs:
        # Skip torchvision's slow truncated-normal init when weights will overwrite it anyway.
        kwargs["init_weights"] = _is_none(pretrained)
    net = getattr(tvm, name)(weights=None, **kwargs)
    layers = [(layer, net.get_submodule(layer)) for layer in spec.layers]
    if name == "vgg16":
        layers.append(("avgpool", nn.AdaptiveAvgPool2d(1)))
    trunk = nn.Sequential(OrderedDict([*layers, ("flatten", nn.Flatten(1))]))
    del net

    _load_pretrained(trunk, name, spec, pretrained)

    mean, std = spec.norm
    if input_mode == "adapt":
        _adapt_first_conv(trunk, spec.first_conv)
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    dim = feature_dim(name)
    module = Backbone(
        name=name,
        stem=InputStem(mean, std),
        trunk=trunk,
        feature_dim=dim,
        min_size=min_input_size(name),
        input_mode=input_mode,
        target_layer_name=spec.target_layer,
    )
    return module, dim


def _is_none(pretrained: str | Path | None) -> bool:
    return pretrained is None or (isinstance(pretrained, str) and pretrained.lower() == "none")


def _adapt_first_conv(trunk: nn.Module, path: str) -> None:
    """Replace the first convolution by a 1-channel one whose kernel is the RGB sum."""
    old = trunk.get_submodule(path)
    assert isinstance(old, nn.Conv2d)
    new = nn.Conv2d(
        1,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_path, _, child = path.rpartition(".")
    parent = trunk.get_submodule(parent_path) if parent_path else trunk
    setattr(parent, child, new)


def _load_pretrained(trunk: nn.Module, name: str, spec: _Spec, pretrained: str | Path) -> None:
    if _is_none(pretrained):
        log.info("backbone %s: random init (pretrained=none)", name)
        return
    if isinstance(pretrained, str) and pretrained.lower() == "imagenet":
        state, source = _imagenet_state_dict(name), f"torchvision {name} IMAGENET1K_V1"
    else:
        state, source = _file_state_dict(Path(pretrained), name), str(pretrained)
    _load_strict(trunk, _clean_state_dict(state, spec.drop_prefixes), name, source)
    log.info("backbone %s: pretrained weights from %s", name, source)


def _imagenet_state_dict(name: str) -> Mapping[str, torch.Tensor]:
    import torch.hub
    from torchvision.models import get_model_weights

    weights = get_model_weights(name)["IMAGENET1K_V1"]
    filename = weights.url.rsplit("/", 1)[-1]
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        # URLError is an OSError: offline machines fail here at once.
        raise ConfigError(
            f"pretrained=imagenet for backbone {name!r}: cannot load {weights.url} ({exc}). "
            f"Without internet, put the file {filename} at {target} "
            f"($TORCH_HOME/hub/checkpoints/{filename}), or use pretrained=PATH to a local "
            f"torchvision state dict, or pretrained=none"
        ) from exc


def _file_state_dict(path: Path, name: str) -> Mapping[str, torch.Tensor]:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(
            f"pretrained weights file {path} for backbone {name!r} does not exist; put a "
            f"torchvision {name} state dict there (e.g. torch.save(torchvision.models."
            f"{name}(weights='IMAGENET1K_V1').state_dict(), '{path}')), or use "
            f"pretrained=imagenet|none"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling/zip errors have no common base class
        raise ConfigError(
            f"cannot read pretrained weights file {path} for backbone {name!r}: {exc}"
        ) from exc
    # Accept the usual wrappers around a state dict: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ConfigError(
            f"pretrained weights file {path} for backbone {name!r} is not a state dict "
            f"(a mapping of names to tensors)"
        )
    return state


def _clean_state_dict(
    state: Mapping[str, torch.Tensor], drop_prefixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Strip a DDP ``module.`` prefix and drop classifier / aux-head keys."""
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if not key.startswith(drop_prefixes):
            cleaned[key] = value
    return cleaned


def _load_strict(trunk: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    expected = trunk.state_dict()
    # Old torchvision files predate BatchNorm's num_batches_tracked; BatchNorm fills it in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        details = (
            [f"missing: {k}" for k in missing[:10]]
            + [f"unexpected: {k}" for k in unexpected[:10]]
            + [f"shape mismatch: {m}" for m in mismatched[:10]]
        )
        raise ConfigError(
            f"pretrained weights {source} do not match backbone {name!r} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mismatched keys; classifier/aux keys "
            f"{', '.join(_SPECS[name].drop_prefixes)} are ignored)",
            details=details,
        )
    trunk.load_state_dict(state, strict=False)


# Module-level builders, one per registered name (the registry points here lazily).
resnet18 = _make_builder("resnet18")
resnet50 = _make_builder("resnet50")
resnext50_32x4d = _make_builder("resnext50_32x4d")
inception_v3 = _make_builder("inception_v3")
vgg16 = _make_builder("vgg16")
googlenet = _make_builder("googlenet")
