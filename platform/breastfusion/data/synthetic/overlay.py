"""Ultrasound screen clutter: a 3x5 bitmap font, overlay marks, and the clutter itself.

None of it depends on the label, so a model can only use it by mistake (cropping to the
lesion matters). Marks are collected on an :class:`Overlay` and applied at the end, outside
the lesion box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from breastfusion.data.synthetic.plan import ImagePlan

Box = tuple[int, int, int, int]
Colour = tuple[float, ...]

# 3x5 bitmap font: deterministic screen text at any scale, no font files needed.
_FONT_ROWS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010",
    "P": "110101110100100", "R": "110101110101101", "S": "011100010001110",
    "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "X": "101101010101101", "Z": "111001010100111", ":": "000010000010000",
    ".": "000000000000010", "-": "000000111000000", "/": "001001010100100",
    "%": "101001010100101", " ": "000000000000000",
}  # fmt: skip
_FONT = {
    ch: np.array([int(c) for c in bits], dtype=bool).reshape(5, 3)
    for ch, bits in _FONT_ROWS.items()
}


def _text_mask(text: str, scale: int) -> np.ndarray:
    glyphs = []
    for ch in text.upper():
        glyphs.append(_FONT.get(ch, _FONT[" "]))
        glyphs.append(np.zeros((5, 1), bool))
    m = np.concatenate(glyphs[:-1], axis=1) if glyphs else np.zeros((5, 1), bool)
    return np.kron(m, np.ones((scale, scale), bool))


class Overlay:
    """Screen marks collected as (mask, colour); applied at the end outside the lesion box."""

    def __init__(self, h: int, w: int, rgb: bool):
        self.alpha = np.zeros((h, w), bool)
        self.colour = np.zeros((h, w, 3), np.float32)
        self.rgb = rgb

    def col(self, rgb_colour: tuple[float, float, float], grey_level: float) -> Colour:
        """The colour on an RGB screen, its grey level on a grey one."""
        return rgb_colour if self.rgb else (grey_level,) * 3

    def stamp(self, mask: np.ndarray, y: int, x: int, colour: Sequence[float]) -> None:
        h, w = self.alpha.shape
        y0, x0 = max(0, y), max(0, x)
        y1, x1 = min(h, y + mask.shape[0]), min(w, x + mask.shape[1])
        if y0 >= y1 or x0 >= x1:
            return
        m = mask[y0 - y : y1 - y, x0 - x : x1 - x]
        self.alpha[y0:y1, x0:x1] |= m
        self.colour[y0:y1, x0:x1][m] = colour

    def rect(self, y0: int, x0: int, y1: int, x1: int, colour: Sequence[float]) -> None:
        self.stamp(np.ones((max(0, y1 - y0), max(0, x1 - x0)), bool), y0, x0, colour)

    def text(self, s: str, y: int, x: int, scale: int, colour: Sequence[float]) -> None:
        self.stamp(_text_mask(s, scale), y, x, colour)


def clutter(
    rng: np.random.Generator, ov: Overlay, im: ImagePlan, scan: Box, box: Box, sc: float
) -> None:
    """Label-independent screen marks: text, depth scale, focus, calipers, bars, pictograms."""
    fs = max(1, round(ov.alpha.shape[0] / 110))
    depth_cm = _text(rng, ov, im, fs)
    _depth_scale(rng, ov, scan, fs, depth_cm)
    _calipers(rng, ov, box, sc)
    _bar(rng, ov, scan)
    _pictograms(rng, ov, fs, sc)


def _text(rng: np.random.Generator, ov: Overlay, im: ImagePlan, fs: int) -> int:
    """Screen text in three corners; returns the displayed depth in cm."""
    h, w = ov.alpha.shape
    white = ov.col((0.92, 0.92, 0.92), 0.92)
    side = "LEFT" if im.laterality == "L" else "RIGHT"
    lines = [
        f"{'BREAST ' + im.laterality if rng.random() < 0.5 else side}",
        f"{int(rng.integers(1, 13))}:00 {int(rng.integers(1, 9))}CM FN",
    ]
    for k, s in enumerate(lines):
        ov.text(s, 1 + k * 6 * fs, 2, fs, white)
    right = [
        f"L{int(rng.integers(9, 19))}-{int(rng.integers(3, 6))} {int(rng.integers(8, 15))}MHZ",
        f"G{int(rng.integers(30, 70))} DR{int(rng.integers(50, 80))}",
    ]
    for k, s in enumerate(right):
        m = _text_mask(s, fs)
        ov.stamp(m, 1 + k * 6 * fs, w - m.shape[1] - 2, white)
    depth_cm = int(rng.integers(3, 6))
    ov.text(f"D {depth_cm}.{int(rng.integers(0, 10))}CM", h - 6 * fs, 2, fs, white)
    return depth_cm


def _depth_scale(rng: np.random.Generator, ov: Overlay, scan: Box, fs: int, depth_cm: int) -> None:
    """A depth scale with ticks in the right margin and a focus marker on it."""
    w = ov.alpha.shape[1]
    _, sy0, sx1, sy1 = scan
    white = ov.col((0.92, 0.92, 0.92), 0.92)
    xs = min(w - 2, sx1 + 1 + fs)
    ov.rect(sy0, xs, sy1, xs + 1, white)
    for k in range(depth_cm + 1):
        ty = sy0 + round(k * (sy1 - sy0 - 1) / depth_cm)
        ov.rect(ty, xs, ty + 1, xs + 2 * fs + 1, white)
    fy = round(rng.uniform(sy0 + 2, sy1 - 3))
    tri = np.tri(2 * fs + 1, fs + 1, dtype=bool) & np.tri(2 * fs + 1, fs + 1, dtype=bool)[::-1]
    ov.stamp(tri[:, ::-1], fy - fs, xs - fs - 2, ov.col((1.0, 0.85, 0.1), 0.8))


def _calipers(rng: np.random.Generator, ov: Overlay, box: Box, sc: float) -> None:
    """Calipers just outside the lesion box, as a sonographer would measure it."""
    arm = max(1, round(2 * sc))
    cross = np.zeros((2 * arm + 1, 2 * arm + 1), bool)
    cross[arm, :] = cross[:, arm] = True
    cal = ov.col((0.2, 1.0, 0.2) if rng.random() < 0.5 else (1.0, 1.0, 0.2), 0.95)
    cyc = (box[1] + box[3]) // 2
    ov.stamp(cross, cyc - arm, box[0] - 2 * arm - 2, cal)
    ov.stamp(cross, cyc - arm, box[2] + 1, cal)
    if rng.random() < 0.5:
        cxc = (box[0] + box[2]) // 2
        ov.stamp(cross, box[1] - 2 * arm - 2, cxc - arm, cal)
        ov.stamp(cross, box[3] + 1, cxc - arm, cal)


def _bar(rng: np.random.Generator, ov: Overlay, scan: Box) -> None:
    """A grey or colour bar in the left margin."""
    sx0, sy0, _, sy1 = scan
    bar_w = max(1, sx0 // 4)
    bx = max(0, sx0 - 2 * bar_w - 1)
    n = max(1, sy1 - sy0)
    ramp = np.linspace(1.0, 0.0, n, dtype=np.float32)
    if ov.rgb and rng.random() < 0.6:
        colours = np.stack([ramp, 0.5 + 0.5 * np.sin(np.pi * ramp), 1.0 - ramp], axis=1)
    else:
        colours = np.repeat(ramp[:, None], 3, axis=1)
    for k in range(bar_w):
        ov.alpha[sy0 : sy0 + n, bx + k] = True
        ov.colour[sy0 : sy0 + n, bx + k] = colours


def _pictograms(rng: np.random.Generator, ov: Overlay, fs: int, sc: float) -> None:
    """A body marker (breast circle with probe line) bottom-left and a logo bottom-right."""
    h, w = ov.alpha.shape
    r = max(2, round(6 * sc))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    ring = np.abs(np.hypot(yy, xx) - r + 0.5) < 0.8
    ang = rng.uniform(0, np.pi)
    ring |= (np.abs(yy * math.cos(ang) - xx * math.sin(ang)) < 0.7) & (np.hypot(yy, xx) < r)
    ov.stamp(ring, h - 2 * r - 2 - 6 * fs, 2, ov.col((0.3, 0.85, 1.0), 0.75))
    if rng.random() < 0.7:
        lw = max(2, round(10 * sc))
        ov.rect(h - lw // 2 - 2, w - lw - 2, h - 2, w - 2, ov.col((1.0, 0.55, 0.1), 0.6))
