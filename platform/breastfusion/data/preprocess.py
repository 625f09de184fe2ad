"""The deterministic preprocessing of one image, and an exact description of it.

``preprocess`` turns a min-max normalised grey image into a ``size`` square uint8 array; the
cache (``cache.py``) stores its output and the datasets divide by 255. ``PreprocessSpec``
holds every parameter that changes the pixels and ``PreprocessSpec.describe()`` spells the
whole chain out (reading, grey conversion, normalisation, padding, resizing, rounding, float
scaling, channels) precisely enough for an exported model's user to reproduce the inputs
without this code; ``tests/test_preprocess.py`` checks that by reimplementing it from the
description alone.

Why padding is the default for both modalities: squashing a US lesion crop to a square erases
its aspect ratio, and "taller than wide" is BI-RADS evidence of malignancy (padding raised US
AUC at every epoch). Squashing stays available (``data.resize: squash``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from breastfusion.errors import ConfigError

# Bump when the preprocessing algorithm changes in a way that alters pixels: every key changes.
PREPROCESS_VERSION = 1
RESIZE_MODES = ("pad", "squash")
ResizeMode = Literal["pad", "squash"]
MODALITIES = ("DM", "US")


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that determines the pixels of a cache entry (goes into model metadata).

    ``size``: side of the square output. ``resize``: ``"pad"`` keeps the aspect ratio by padding
    with black to a square before resizing (default: geometry, such as a lesion's orientation,
    is evidence); ``"squash"`` stretches to square (no padded pixels, distorted shapes).
    """

    size: int
    resize: ResizeMode = "pad"
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"preprocessing size must be a positive integer, got {self.size!r}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(
                f"data.resize must be one of {list(RESIZE_MODES)}, got {self.resize!r}"
            )

    def to_dict(self) -> dict[str, int | str]:
        return {"size": self.size, "resize": self.resize, "version": self.version}

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the parameters (stable across runs and machines)."""
        from breastfusion.io import sha256_json

        return sha256_json({"preprocess": self.to_dict()})

    def describe(self) -> dict[str, Any]:
        """The exact preprocessing chain as data (JSON-safe), for exported models' metadata."""
        return describe(self)


def default_spec(modality: str, size: int, resize: str = "pad") -> PreprocessSpec:
    """The spec of a modality's branch: both modalities pad by default (``data.resize``)."""
    mod = str(modality).upper()
    if mod not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r} (expected DM or US)")
    if resize not in RESIZE_MODES:
        raise ConfigError(
            f"data.resize must be one of {list(RESIZE_MODES)}, got {resize!r} "
            "('auto' is gone: both modalities pad unless data.resize is squash)"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.size_{mod.lower()} must be a positive integer, got {size!r}")
    return PreprocessSpec(size=size, resize=resize)  # type: ignore[arg-type]


def _interpolation(h: int, w: int, size: int) -> int:
    import cv2

    # Any shrinking axis → area averaging (no aliasing of calcifications/speckle); only a pure
    # enlargement is bilinear. Padded images are square, so both axes agree there.
    return cv2.INTER_AREA if size < h or size < w else cv2.INTER_LINEAR


def pad_to_square(img: np.ndarray) -> np.ndarray:
    """Centre ``img`` on a black (0) square of side max(H, W); an odd remainder goes to the
    bottom/right (top = (side - H) // 2, left = (side - W) // 2)."""
    h, w = img.shape
    if h == w:
        return img
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = np.zeros((side, side), dtype=np.float32)
    padded[top : top + h, left : left + w] = img
    return padded


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize a normalised float image in [0, 1] (H×W) to a ``spec.size`` square uint8 array.

    Resizing happens in float32 (before quantisation) so that downscaling averages the full
    intensity resolution.
    """
    import cv2

    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
    img = np.asarray(image, dtype=np.float32)
    if spec.resize == "pad":
        img = pad_to_square(img)
    h, w = img.shape
    s = spec.size
    if (h, w) != (s, s):
        img = cv2.resize(img, (s, s), interpolation=_interpolation(h, w, s))
    return np.clip(img * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8)


_READ = {
    "output": "float32 H×W raw intensities (one grey channel)",
    "png_jpeg_tiff": {
        "library": "Pillow",
        "grey_8_16_32bit_float": "values as stored (16-bit keeps its full range, no rescaling)",
        "rgb_rgba": "0.299 R + 0.587 G + 0.114 B in float32 (ITU-R BT.601 luma); alpha dropped",
        "grey_alpha": "grey channel; alpha dropped",
        "palette": "converted to RGBA by Pillow, then as RGBA",
        "bilevel_1bit": "converted to 8-bit grey by Pillow (0 or 255)",
        "cmyk_ycbcr_lab_hsv": "converted to RGB by Pillow, then as RGB",
        "multi_page_tiff": "first page",
    },
    "dicom": {
        "library": "pydicom",
        "modality_lut": "Modality LUT Sequence if present, else stored * RescaleSlope + "
        "RescaleIntercept (defaults 1 and 0), in float64",
        "monochrome1": "inverted: (lo + hi) - value, where lo/hi are the stored-value range "
        "allowed by BitsStored and PixelRepresentation, mapped through the same modality "
        "transform (not the image's own min/max)",
        "voi_window": "not applied",
        "float_pixel_data": "values as stored",
        "colour": "converted to RGB by pydicom, then 0.299 R + 0.587 G + 0.114 B",
        "multi_frame": "first frame",
    },
}


def describe(spec: PreprocessSpec) -> dict[str, Any]:
    """Every step from file to model input, in order, with the exact rule of each.

    Step ``op`` names are stable identifiers; ``parameters`` hold the values a reimplementation
    needs. Rounding and dtypes are part of the contract: the cache stores the uint8 result.
    """
    s = spec.size
    steps: list[dict[str, Any]] = [
        {"op": "read_grey", "parameters": _READ},
        {
            "op": "minmax",
            "formula": "(x - min(x)) / (max(x) - min(x)), computed in float64, clipped to "
            "[0, 1], cast to float32",
            "parameters": {"compute_dtype": "float64", "output_dtype": "float32"},
            "constant_image": "rejected (error), never divided by zero",
        },
    ]
    if spec.resize == "pad":
        steps.append(
            {
                "op": "pad_to_square",
                "formula": "side = max(H, W); top = (side - H) // 2; left = (side - W) // 2; "
                "the odd pixel, if any, goes to the bottom / right",
                "parameters": {"value": 0.0, "position": "centre", "odd_remainder": "bottom_right"},
            }
        )
    steps += [
        {
            "op": "resize",
            "formula": f"to {s} × {s} (width × height) in float32"
            + ("" if spec.resize == "pad" else ", aspect ratio not kept (squash)")
            + "; skipped when the image already has that shape",
            "parameters": {
                "width": s,
                "height": s,
                "dtype": "float32",
                "library": "opencv",
                "function": "cv2.resize(img, (width, height), interpolation=...)",
                "interpolation_when_any_axis_shrinks": "INTER_AREA",
                "interpolation_when_enlarging": "INTER_LINEAR",
                "pixel_centres": "half-pixel aligned: src = (dst + 0.5) * in / out - 0.5",
                "equivalents": "INTER_AREA shrink = exact box (area-weighted) average, e.g. "
                "Pillow BOX; INTER_LINEAR = bilinear without antialiasing, e.g. torch "
                "interpolate(mode='bilinear', align_corners=False, antialias=False)",
            },
        },
        {
            "op": "quantise_uint8",
            "formula": "uint8(floor(clip(x * 255 + 0.5, 0, 255))) with x * 255 + 0.5 in float32 "
            "(round half up)",
            "parameters": {"scale": 255.0, "offset": 0.5, "rounding": "half_up", "dtype": "uint8"},
        },
        {
            "op": "to_float",
            "formula": "float32(q) / 255 → [0, 1], shape (1, H, W)",
            "parameters": {"divisor": 255.0, "dtype": "float32", "layout": "1×H×W"},
        },
        {
            "op": "model_input",
            "formula": "one grey channel in [0, 1] per branch; the model itself replicates it "
            "to 3 channels (or uses a 1-channel first convolution) and applies the ImageNet "
            "normalisation, so callers pass the [0, 1] grey tensor unchanged",
            "parameters": {"channels": 1, "range": [0.0, 1.0], "imagenet_norm_in_model": True},
        },
    ]
    return {**spec.to_dict(), "hash": spec.hash, "steps": steps}
