"""Preprocessing cache: reuse without decoding, keys, atomicity, corruption, resize modes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastfusion.data import cache as cache_mod
from breastfusion.data import imaging
from breastfusion.data.cache import (
    ImageCache,
    PreprocessSpec,
    default_spec,
    preprocess,
    warm_cache,
)
from breastfusion.errors import ConfigError, ImageError


def _png(path: Path, h: int, w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    arr[0, 0], arr[-1, -1] = 0, 255  # never constant
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    return [_png(src / f"img{i}.png", 40, 56, i) for i in range(4)]


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of imaging.load_normalised, by path (the only way the cache decodes)."""
    calls: list[str] = []
    real = imaging.load_normalised

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(imaging, "load_normalised", counting)
    return calls


def test_spec_hash_is_stable_and_covers_every_parameter():
    a = PreprocessSpec(64, "pad")
    assert a.hash == PreprocessSpec(64, "pad").hash and len(a.hash) == 64
    others = [
        PreprocessSpec(32, "pad"),
        PreprocessSpec(64, "squash"),
        PreprocessSpec(64, "pad", 99),
    ]
    assert len({a.hash, *(s.hash for s in others)}) == 4
    assert a.to_dict() == {"size": 64, "resize": "pad", "version": cache_mod.PREPROCESS_VERSION}


@pytest.mark.parametrize("bad", [dict(size=0), dict(size=32, resize="crop"), dict(size=2.5)])
def test_spec_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match="size|resize"):
        PreprocessSpec(**bad)


def test_default_spec_pads_mammograms_and_squashes_crops():
    assert default_spec("dm", 64).resize == "pad"
    assert default_spec("US", 32).resize == "squash"
    with pytest.raises(ConfigError, match="MRI"):
        default_spec("MRI", 32)


def test_pad_keeps_aspect_squash_fills_square():
    img = np.ones((20, 40), dtype=np.float32)  # wide white image
    pad = preprocess(img, PreprocessSpec(32, "pad"))
    squash = preprocess(img, PreprocessSpec(32, "squash"))
    assert pad.shape == squash.shape == (32, 32) and pad.dtype == np.uint8
    assert (squash == 255).all()
    # Padding to 40×40 puts 10 black rows above and below; at 32 px that is 8 rows each.
    assert (pad[:7] == 0).all() and (pad[-7:] == 0).all()
    assert (pad[9:-9] == 255).all()
    assert (pad[:, 0] == 255).any()  # no padding on the long side


def test_downscale_uses_area_averaging():
    # A 1-px checkerboard averages to mid-grey under area interpolation (nearest would alias).
    board = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    out = preprocess(board, PreprocessSpec(32, "squash"))
    assert np.abs(out.astype(int) - 128).max() <= 1


def test_second_run_decodes_nothing(tmp_path, images, decodes):
    spec = PreprocessSpec(32, "pad")
    c = ImageCache(tmp_path / "cache")
    first, rep1 = c.load_many(images, spec)
    assert (rep1.decoded, rep1.reused) == (4, 0) and len(decodes) == 4
    second, rep2 = ImageCache(tmp_path / "cache").load_many(images, spec)
    assert (rep2.decoded, rep2.reused) == (0, 4)
    assert len(decodes) == 4  # no new decode
    np.testing.assert_array_equal(first, second)
    assert first.shape == (4, 32, 32) and first.dtype == np.uint8
    assert (c.spec_dir(spec) / "spec.json").exists()


def test_changed_size_makes_new_entry(tmp_path, images, decodes):
    c = ImageCache(tmp_path / "cache")
    c.warm(images, PreprocessSpec(32))
    rep = c.warm(images, PreprocessSpec(48))
    assert rep.decoded == 4 and len(decodes) == 8
    assert c.entry_path(images[0], PreprocessSpec(32)) != c.entry_path(
        images[0], PreprocessSpec(48)
    )
    assert c.entry_path(images[0], PreprocessSpec(32)).exists()
    assert c.get(images[0], PreprocessSpec(48)).shape == (48, 48)
    assert len(decodes) == 8


def test_changed_source_file_is_decoded_again(tmp_path, images, decodes):
    c = ImageCache(tmp_path / "cache")
    spec = PreprocessSpec(32)
    old = c.get(images[0], spec).copy()
    _png(images[0], 40, 56, seed=123)
    st = os.stat(images[0])
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    new = c.get(images[0], spec)
    assert len(decodes) == 2 and not np.array_equal(old, new)


def test_stale_temp_file_is_not_trusted(tmp_path, images, decodes):
    c = ImageCache(tmp_path / "cache")
    spec = PreprocessSpec(32)
    entry = c.entry_path(images[0], spec)
    entry.parent.mkdir(parents=True)
    # What an interrupted writer leaves behind: a temp file next to the entry.
    stale = entry.parent / f".{entry.name}.abc123.tmp"
    stale.write_bytes(b"BFC1 half written")
    arr = c.get(images[0], spec)
    assert len(decodes) == 1 and arr.shape == (32, 32)
    assert entry.exists()


def test_interrupted_write_leaves_no_entry(tmp_path, images, decodes, monkeypatch):
    c = ImageCache(tmp_path / "cache")
    spec = PreprocessSpec(32)
    c._write_spec(spec)  # isolate the entry write below

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(os, "replace", killed)
        c.get(images[0], spec)
    entry = c.entry_path(images[0], spec)
    assert not entry.exists()
    assert not list(entry.parent.glob("*.tmp"))  # the temp file was cleaned up too
    rep = c.warm(images[:1], spec)
    assert rep.decoded == 1 and len(decodes) == 2 and entry.exists()


def _load(path):
    return imaging.minmax(imaging.read_grey(path))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, images, decodes, damage):
    c = ImageCache(tmp_path / "cache")
    spec = PreprocessSpec(32)
    good = c.get(images[0], spec).copy()
    entry = c.entry_path(images[0], spec)
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":
        data[-5] ^= 0xFF
    else:
        data = bytearray(b"\x00" * len(data))
    entry.write_bytes(bytes(data))
    rep = c.warm(images[:1], spec)
    assert (rep.decoded, rep.corrupt, rep.reused) == (1, 1, 0)
    np.testing.assert_array_equal(c.get(images[0], spec), good)
    assert len(decodes) == 2


def test_missing_source_names_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png"):
        ImageCache(tmp_path / "cache").get(missing, PreprocessSpec(32))


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_parallel_warm_then_serial_reuse(tmp_path, images, pool):
    root = tmp_path / "cache"
    spec = PreprocessSpec(32, "squash")
    rep = warm_cache(
        root, images + images[:1], spec, workers=2, pool=pool
    )  # duplicates counted once
    assert (rep.decoded, rep.reused) == (4, 0)
    arrays, rep2 = ImageCache(root).load_many(images, spec)
    assert (rep2.decoded, rep2.reused) == (0, 4)
    np.testing.assert_array_equal(arrays[1], preprocess(_load(images[1]), spec))
    assert "4 decoded" in str(rep)
