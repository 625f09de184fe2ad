"""Image reading (PNG, JPEG, TIFF, DICOM), grey conversion and min-max normalisation.

One entry point, :func:`read_grey`, turns any supported file into a float32 H×W array of raw
intensities, so that every later stage (cache, datasets, ROI crops) sees one kind of input:

- PNG / JPEG / TIFF via Pillow: 8- and 16-bit grey, float TIFF, grey+alpha, RGB, RGBA and
  palette images. Colour becomes luminance with the ITU-R BT.601 weights
  (0.299 R + 0.587 G + 0.114 B) computed in float, so 16-bit grey keeps its full precision and
  colour does not get rounded to 8 bits twice. Alpha is dropped (medical images are opaque;
  transparency carries no intensity). Multi-page TIFF: the first page.
- DICOM via pydicom (detected by the ``DICM`` magic at byte 128 or a ``.dcm``/``.dicom``
  suffix): the Modality LUT or RescaleSlope/RescaleIntercept is applied, MONOCHROME1 is
  inverted so that bright always means dense tissue, and VOI windowing is *not* applied (the
  study normalises by min-max instead). Only the pixel-module elements are read from the
  file (``specific_tags``), so patient identifiers never enter memory, let alone leave the
  reader. Multi-frame objects (tomosynthesis, cine loops) yield their **first frame only**:
  the models here are 2-D and one image per manifest row; a warning says so, and a user who
  wants another frame exports it as its own file and manifest row.

:func:`minmax` is the study's per-image normalisation ``(x - min) / (max - min)``; a constant,
empty or non-finite image is an :class:`~breastfusion.errors.ImageError`, never a division by
zero or a silent NaN. :func:`image_size` reads only headers, so validating thousands of
manifest rows stays fast.

Every failure is an ``ImageError`` whose message starts with the file path and says why.
This module stays light (numpy, Pillow, pydicom only; no torch).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from breastfusion.errors import ImageError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

# ITU-R BT.601 luma weights, as in Pillow's own "L" conversion, but applied in float.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# The only DICOM elements the reader loads: the Image Pixel and Modality LUT modules. Reading
# nothing else is what guarantees that no patient tag can leak out of this module.
_DICOM_PIXEL_TAGS = [
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
]


def _error(path: PathLike, reason: str) -> ImageError:
    return ImageError(f"{os.fspath(path)}: {reason}")


def _check_file(path: PathLike) -> Path:
    """Existence, kind and emptiness: the failures that need no decoder to explain."""
    p = Path(path)
    if not p.exists():
        raise _error(p, "file not found")
    if not p.is_file():
        raise _error(p, "not a regular file")
    try:
        size = p.stat().st_size
    except OSError as exc:  # permissions, broken mounts
        raise _error(p, f"cannot access file ({exc.strerror or exc})") from exc
    if size == 0:
        raise _error(p, "empty file (0 bytes)")
    return p


def is_dicom(path: PathLike) -> bool:
    """True for a DICOM suffix or the ``DICM`` magic at byte 128 (DICOM Part 10 files)."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _has_dicom_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


# --------------------------------------------------------------------------------------------
# DICOM


def _dcmread_pixels_only(path: Path, *, stop_before_pixels: bool = False):
    """Read only the pixel-related elements of a DICOM file (no patient or study tags)."""
    import pydicom

    # A .dcm file without the 128-byte preamble is still DICOM; force lets pydicom read it.
    force = not _has_dicom_magic(path)
    try:
        return pydicom.dcmread(
            path,
            force=force,
            stop_before_pixels=stop_before_pixels,
            specific_tags=list(_DICOM_PIXEL_TAGS),
        )
    except Exception as exc:  # pydicom raises many types for broken files
        raise _error(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _stored_value_range(ds) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _modality_transform(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values → modality values (Modality LUT, else slope/intercept; defaults 1 and 0)."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    out = arr.astype(np.float64)
    if slope != 1.0:
        out *= slope
    if intercept != 0.0:
        out += intercept
    return out


def _read_dicom(path: Path) -> np.ndarray:
    from pydicom.pixels import pixel_array

    ds = _dcmread_pixels_only(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _error(path, "DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        logger.warning("%s: multi-frame DICOM (%d frames); using the first frame", path, frames)
    try:
        # index=0 decodes only the first frame of a multi-frame object (memory, speed).
        arr = pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as exc:
        raise _error(path, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if arr.ndim == 3:  # colour (YBR is converted to RGB by pydicom)
        return _to_grey(arr, path)
    if "PixelData" not in ds:  # float pixel data carries real values already
        return arr.astype(np.float32)
    out = _modality_transform(arr, ds)
    if photometric == "MONOCHROME1":
        # Invert within the range the stored bits allow (mapped like the pixels), not the
        # image's own min/max, so raw values stay comparable between files.
        lo, hi = _modality_transform(np.array(_stored_value_range(ds)), ds)
        out = (lo + hi) - out
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Pillow formats


def _to_grey(arr: np.ndarray, path: Path) -> np.ndarray:
    """H×W, H×W×2 (grey+alpha), H×W×3 or H×W×4 (alpha dropped) → float32 H×W."""
    if arr.ndim == 2:
        return arr.astype(np.float32)
    if arr.ndim == 3 and arr.shape[2] in (1, 2):
        return arr[:, :, 0].astype(np.float32)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return arr[:, :, :3].astype(np.float32) @ _LUMA
    raise _error(path, f"unsupported pixel layout {arr.shape}")


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # full decode here, so truncated files fail now, not later
            return _pil_to_grey(im, path)
    except UnidentifiedImageError as exc:
        raise _error(path, "not an image (unrecognised format)") from exc
    except ImageError:
        raise
    except Exception as exc:  # OSError for truncated data, DecompressionBombError, ...
        raise _error(path, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc


def _pil_to_grey(im, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("P", "PA"):
        # Via RGBA so palettes with transparency convert without Pillow's warning.
        im = im.convert("RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
        im = im.convert("RGB") if mode != "La" else im.convert("LA")
    # I;16 (16-bit grey), I (32-bit int) and F (float) come through np.asarray unchanged.
    return _to_grey(np.asarray(im), path)


# --------------------------------------------------------------------------------------------
# Public API


def read_grey(path: PathLike) -> np.ndarray:
    """Read any supported image as a float32 H×W array of raw (unnormalised) intensities."""
    p = _check_file(path)
    arr = _read_dicom(p) if is_dicom(p) else _read_pil(p)
    if arr.ndim != 2 or arr.size == 0:
        raise _error(p, f"zero-size image (shape {arr.shape})")
    return np.ascontiguousarray(arr, dtype=np.float32)


def minmax(array: np.ndarray, source: PathLike | None = None) -> np.ndarray:
    """Per-image min-max normalisation ``(x - min) / (max - min)`` to float32 in [0, 1].

    ``source`` names the file in error messages. A constant image has no contrast to stretch
    (and would divide by zero), so it is an error rather than an all-zero image.
    """
    name = os.fspath(source) if source is not None else "image"
    arr = np.asarray(array)
    if arr.size == 0:
        raise ImageError(f"{name}: empty image (shape {arr.shape})")
    x = arr.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ImageError(f"{name}: image contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        raise ImageError(
            f"{name}: constant image (every pixel is {lo:g}); min-max normalisation is undefined"
        )
    out = (x - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32)


def load_normalised(path: PathLike) -> np.ndarray:
    """:func:`read_grey` then :func:`minmax`: float32 H×W in [0, 1]."""
    return minmax(read_grey(path), source=path)


Box = tuple[int, int, int, int]


def box_of(foreground: np.ndarray) -> Box | None:
    """Bounding box ``(x0, y0, x1, y1)`` of the True pixels of a 2-D mask, or None if empty.

    The manifest's convention: x0/y0 inclusive, x1/y1 exclusive (slice bounds), so a mask
    covering the whole image gives ``(0, 0, width, height)``.
    """
    fg = np.asarray(foreground, dtype=bool)
    rows = np.flatnonzero(fg.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(fg.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def union_boxes(boxes) -> Box | None:
    """The smallest box holding every box of ``boxes`` (None for none)."""
    boxes = list(boxes)
    if not boxes:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def image_size(path: PathLike) -> tuple[int, int]:
    """(width, height) from the header only (no pixel decode), for box checks on many files."""
    p = _check_file(path)
    if is_dicom(p):
        ds = _dcmread_pixels_only(p, stop_before_pixels=True)
        try:
            width, height = int(ds.Columns), int(ds.Rows)
        except (AttributeError, TypeError, ValueError) as exc:
            raise _error(p, "DICOM file has no valid Rows/Columns") from exc
    else:
        width, height = _pil_size(p)
    if width <= 0 or height <= 0:
        raise _error(p, f"zero-size image ({width}x{height})")
    return width, height


def _pil_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # lazy: reads the header, not the pixels
            return im.size
    except UnidentifiedImageError as exc:
        raise _error(path, "not an image (unrecognised format)") from exc
    except Exception as exc:
        raise _error(path, f"unreadable image header ({type(exc).__name__}: {exc})") from exc
