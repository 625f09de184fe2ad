"""Small file and path helpers shared by the ROI modules (light: numpy, pandas, Pillow)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.manifest import BOX_COLUMNS
from breastfusion.io import portable_path


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a 2-D uint8/uint16 array as a grey PNG (mode L or I;16)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype != np.uint16:
        array = array.astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")


def safe_name(text: str) -> str:
    """A file-name-safe version of a patient id (ids are free text in the manifest)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "patient"


def row_box(row: pd.Series) -> tuple[float, float, float, float] | None:
    """The manifest box of a row, or None if any coordinate is missing."""
    values = []
    for col in BOX_COLUMNS:
        v = row.get(col)
        if v is None or (isinstance(v, float) and math.isnan(v)) or pd.isna(v):
            return None
        values.append(float(v))
    return (values[0], values[1], values[2], values[3])


def relative_path(target: str | os.PathLike, start: Path) -> str:
    """``target`` as a manifest in ``start`` may store it: relative inside ``start``,
    absolute outside (``load_manifest`` refuses ``..``)."""
    return portable_path(target, start)
