"""ROI geometry and pixels: the one crop rule shared by ``roi crop`` and ``predict``.

:func:`crop_image` turns a raw grey image and its ROI (a detection, a manifest box, or
nothing) into the crop array that ``crop_manifest`` saves, so a model served on new patients
sees crops made exactly as in the study. Light: numpy only.

Conventions:

- Boxes are ``(x0, y0, x1, y1)`` in pixels of the source image, x1/y1 exclusive (the manifest's
  convention). A crop window is the same tuple in integer pixels, clipped to the image.
- ``margin`` is a fraction of the box's own width/height added on *each* side, so a 0.1 margin
  around a 100 x 50 box gives a 120 x 60 window (before clipping). Context around the lesion
  edge (posterior shadowing, margins) is diagnostic in ultrasound; a tight box would cut it.
- Detection sees the same 8-bit image that the detector was trained on (per-image min-max of
  ``read_grey``: :func:`detector_image`), but crops are cut from the raw intensities and kept
  at their bit depth (:func:`encode_crop`), so the later min-max normalisation runs on the
  crop itself, as in the study.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from breastfusion.data.imaging import minmax
from breastfusion.errors import ConfigError
from breastfusion.roi.settings import CropSettings

Window = tuple[int, int, int, int]
Box = tuple[float, float, float, float]
ROI_SOURCES: tuple[str, ...] = ("detected", "box", "fallback")


@dataclass(frozen=True)
class Detection:
    """The best box the detector found in one image (pixels of that image) and its score."""

    x0: float
    y0: float
    x1: float
    y1: float
    confidence: float

    @property
    def box(self) -> Box:
        return (self.x0, self.y0, self.x1, self.y1)


# A detector takes 8-bit grey H x W arrays and returns, per image, its best box or None.
Detector = Callable[[Sequence[np.ndarray]], list[Detection | None]]


def expand_box(box: Sequence[float], width: int, height: int, margin: float = 0.1) -> Window:
    """The integer crop window around ``box`` with ``margin`` per side, clipped to the image.

    Rounds outwards (floor/ceil) so the window always contains the whole box, and never
    returns an empty window: a degenerate box still yields at least one pixel.
    """
    if not margin >= 0:
        raise ConfigError(f"roi.crop.margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0:
        x0, x1 = x1, x0
    if y1 < y0:
        y0, y1 = y1, y0
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    wx0 = min(max(0, math.floor(x0 - dx)), width - 1)
    wy0 = min(max(0, math.floor(y0 - dy)), height - 1)
    wx1 = max(min(width, math.ceil(x1 + dx)), wx0 + 1)
    wy1 = max(min(height, math.ceil(y1 + dy)), wy0 + 1)
    return (wx0, wy0, wx1, wy1)


def centre_window(width: int, height: int, fraction: float = 0.6) -> Window:
    """The central ``fraction`` of each side: US lesions are usually scanned near the centre,
    while text, calipers and colour bars sit at the borders."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"roi.crop.centre_fraction must be in (0, 1], got {fraction}")
    cw, ch = max(1, round(width * fraction)), max(1, round(height * fraction))
    x0, y0 = (width - cw) // 2, (height - ch) // 2
    return (x0, y0, x0 + cw, y0 + ch)


def box_in_window(box: Sequence[float], window: Window) -> Box | None:
    """``box`` in the coordinates of a crop ``window`` (clipped); None if nothing is left."""
    wx0, wy0, wx1, wy1 = window
    x0 = min(max(box[0] - wx0, 0.0), wx1 - wx0)
    y0 = min(max(box[1] - wy0, 0.0), wy1 - wy0)
    x1 = min(max(box[2] - wx0, 0.0), wx1 - wx0)
    y1 = min(max(box[3] - wy0, 0.0), wy1 - wy0)
    if x1 <= x0 or y1 <= y0:
        return None
    return (float(x0), float(y0), float(x1), float(y1))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 when disjoint/empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# ------------------------------------------------------------------------------- pixel data


def to_uint8(normalised: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (the detector's input, in training and detection alike)."""
    return np.clip(np.rint(np.asarray(normalised, dtype=np.float32) * 255.0), 0, 255).astype(
        np.uint8
    )


def detector_image(raw: np.ndarray, *, source: str = "image") -> np.ndarray:
    """What the detector sees of a raw grey image: per-image min-max, then 8-bit.

    The same transform produced the detector's training images, so callers outside
    ``crop_manifest`` (``predict``) must use this rather than their own normalisation.
    """
    return to_uint8(minmax(raw, source=source))


def encode_crop(raw: np.ndarray) -> np.ndarray:
    """Pick a lossless PNG dtype for a crop of raw intensities.

    8-bit sources stay 8-bit and 16-bit sources (DICOM, 16-bit PNG/TIFF) stay 16-bit, so no
    grey levels are lost. Values PNG cannot hold (negative, fractional, > 65535, e.g. a DICOM
    with rescale slope/intercept) are min-max scaled to 16 bits: a monotone rescale that the
    per-image min-max normalisation downstream undoes anyway.
    """
    raw = np.asarray(raw)
    finite = np.nan_to_num(raw.astype(np.float64), nan=0.0)
    lo, hi = float(finite.min()), float(finite.max())
    integral = bool(np.all(finite == np.round(finite)))
    if integral and lo >= 0 and hi <= 255:
        return finite.astype(np.uint8)
    if integral and lo >= 0 and hi <= 65535:
        return finite.astype(np.uint16)
    if hi <= lo:
        return np.zeros(finite.shape, dtype=np.uint16)
    return np.rint((finite - lo) / (hi - lo) * 65535.0).astype(np.uint16)


# ---------------------------------------------------------------------------- the crop rule


def choose_window(
    roi: Detection | Sequence[float] | None, width: int, height: int, settings: CropSettings
) -> dict[str, Any]:
    """Where to crop and why: ``roi_source`` and ``window`` (None: the row is dropped).

    A :class:`Detection` gives ``detected``, a plain box (a trusted manifest box) ``box``,
    and ``None`` the fallback rule of ``settings`` (``fallback``; ``drop`` -> ``dropped``).
    """
    info: dict[str, Any] = {"det_box": None, "confidence": None}
    if isinstance(roi, Detection):
        info.update(
            roi_source="detected",
            window=expand_box(roi.box, width, height, settings.margin),
            det_box=tuple(float(v) for v in roi.box),
            confidence=float(roi.confidence),
        )
    elif roi is not None:
        box = tuple(float(v) for v in roi)
        info.update(roi_source="box", window=expand_box(box, width, height, settings.margin))
    elif settings.fallback == "drop":
        info.update(roi_source="dropped", window=None)
    elif settings.fallback == "centre":
        info.update(
            roi_source="fallback", window=centre_window(width, height, settings.centre_fraction)
        )
    else:
        info.update(roi_source="fallback", window=(0, 0, width, height))
    return info


def crop_image(
    raw: np.ndarray,
    roi: Detection | Sequence[float] | None,
    settings: CropSettings | None = None,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The ROI crop of one raw grey image, exactly as ``crop_manifest`` saves it.

    ``raw`` is ``read_grey``'s H x W array; ``roi`` the detector's best :class:`Detection`
    for it, a manifest box ``(x0, y0, x1, y1)``, or ``None`` (nothing detected). Returns the
    crop (uint8 or uint16, see :func:`encode_crop`; ``None`` when the fallback is ``drop``)
    and an info dict: ``roi_source`` (detected | box | fallback | dropped), ``window`` (the
    crop in source pixels), ``det_box`` and ``confidence`` (the raw detection, or None).
    """
    settings = settings or CropSettings()
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"crop_image needs a 2-D grey image, got shape {raw.shape}")
    height, width = raw.shape
    info = choose_window(roi, width, height, settings)
    if info["window"] is None:
        return None, info
    x0, y0, x1, y1 = info["window"]
    return encode_crop(raw[y0:y1, x0:x1]), info
