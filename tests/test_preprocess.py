"""PreprocessSpec.describe(): a reimplementation written only from its values matches the code.

The reimplementation below deliberately uses none of breastfusion's preprocessing code: every
constant and choice it makes (luma weights, float64 min-max, pad position and value, OpenCV
flags, rounding offset, divisor) is read from ``describe()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from breastfusion.data import imaging
from breastfusion.data.cache import ImageCache
from breastfusion.data.preprocess import PreprocessSpec, describe, preprocess


def _step(desc: dict, op: str) -> dict:
    (step,) = [s for s in desc["steps"] if s["op"] == op]
    return step


def _luma_from_text(text: str) -> np.ndarray:
    # "0.299 R + 0.587 G + 0.114 B in float32 ..." → the three weights, in R, G, B order.
    terms = text.split(" in ")[0].split(" + ")
    return np.array([float(t.split()[0]) for t in terms], dtype=np.float32)


def _reimplementation(path: Path, desc: dict) -> np.ndarray:
    """From file to uint8, following ``desc`` only."""
    read = _step(desc, "read_grey")["parameters"]["png_jpeg_tiff"]
    arr = np.asarray(Image.open(path))
    if arr.ndim == 3:
        assert "alpha dropped" in read["rgb_rgba"]
        x = arr[:, :, :3].astype(np.float32) @ _luma_from_text(read["rgb_rgba"])
    else:
        assert read["grey_8_16_32bit_float"].startswith("values as stored")
        x = arr.astype(np.float32)
    mm = _step(desc, "minmax")["parameters"]
    x = x.astype(mm["compute_dtype"])
    x = np.clip((x - x.min()) / (x.max() - x.min()), 0, 1).astype(mm["output_dtype"])
    pads = [s for s in desc["steps"] if s["op"] == "pad_to_square"]
    if pads:
        p = pads[0]["parameters"]
        assert p["position"] == "centre" and p["odd_remainder"] == "bottom_right"
        h, w = x.shape
        side = max(h, w)
        before_h, before_w = (side - h) // 2, (side - w) // 2  # odd pixel after: bottom/right
        x = np.pad(
            x,
            ((before_h, side - h - before_h), (before_w, side - w - before_w)),
            constant_values=p["value"],
        )
    r = _step(desc, "resize")["parameters"]
    assert r["library"] == "opencv"
    h, w = x.shape
    if (h, w) != (r["height"], r["width"]):
        shrinks = r["width"] < w or r["height"] < h
        flag = r[
            "interpolation_when_any_axis_shrinks" if shrinks else "interpolation_when_enlarging"
        ]
        x = cv2.resize(
            x.astype(r["dtype"]), (r["width"], r["height"]), interpolation=getattr(cv2, flag)
        )
    q = _step(desc, "quantise_uint8")["parameters"]
    assert q["rounding"] == "half_up"
    x = x.astype(np.float32) * np.float32(q["scale"]) + np.float32(q["offset"])
    return np.floor(np.clip(x, 0, q["scale"])).astype(q["dtype"])


def _image(path: Path, shape: tuple[int, ...], dtype, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max
    arr = rng.integers(0, hi // 3, size=shape).astype(dtype)
    arr[(0,) * len(shape)] = hi  # a bright outlier: min-max must use the true extremes
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize(
    "shape,dtype,size,resize",
    [
        ((45, 28), np.uint16, 24, "pad"),  # 16-bit, tall, odd padding, shrink
        ((13, 20), np.uint8, 32, "pad"),  # wide, odd padding, enlarge
        ((30, 41, 3), np.uint8, 16, "pad"),  # RGB → luma
        ((30, 17), np.uint8, 24, "squash"),  # one axis shrinks, one grows
    ],
)
def test_reimplementation_from_describe_matches_the_cache_bytes(
    tmp_path, shape, dtype, size, resize
):
    spec = PreprocessSpec(size, resize)
    desc = json.loads(json.dumps(spec.describe()))  # only what metadata.json would carry
    src = _image(tmp_path / "img.png", shape, dtype, seed=size)
    theirs = _reimplementation(src, desc)
    ours = ImageCache(tmp_path / "cache").get(src, spec)
    assert theirs.dtype == np.uint8 and theirs.shape == (size, size)
    np.testing.assert_array_equal(theirs, ours)
    to_float = _step(desc, "to_float")["parameters"]
    np.testing.assert_array_equal(
        theirs.astype(to_float["dtype"]) / np.float32(to_float["divisor"]),
        ours.astype(np.float32) / np.float32(255.0),
    )


def test_description_matches_the_code_it_describes():
    desc = describe(PreprocessSpec(64, "pad"))
    assert {"size": 64, "resize": "pad"}.items() <= desc.items()
    assert desc["hash"] == PreprocessSpec(64, "pad").hash
    ops = [s["op"] for s in desc["steps"]]
    assert ops == [
        "read_grey",
        "minmax",
        "pad_to_square",
        "resize",
        "quantise_uint8",
        "to_float",
        "model_input",
    ]
    luma = _luma_from_text(_step(desc, "read_grey")["parameters"]["png_jpeg_tiff"]["rgb_rgba"])
    np.testing.assert_array_equal(luma, imaging._LUMA)
    squash_ops = [s["op"] for s in describe(PreprocessSpec(64, "squash"))["steps"]]
    assert "pad_to_square" not in squash_ops and "squash" in str(
        describe(PreprocessSpec(64, "squash"))
    )
    model = _step(desc, "model_input")["parameters"]
    assert model["channels"] == 1 and model["imagenet_norm_in_model"] is True


def test_odd_padding_goes_bottom_right():
    img = np.ones((3, 6), dtype=np.float32)  # pad 3 rows: 1 above, 2 below
    out = preprocess(img, PreprocessSpec(6, "pad"))
    assert out[:1].max() == 0 and (out[1:4] == 255).all() and out[4:].max() == 0
