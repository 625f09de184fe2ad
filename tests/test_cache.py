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
    default_cache_dir,
    default_spec,
    preprocess,
    warm_cache,
)
from breastfusion.errors import ConfigError, ImageError, UserError


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


@pytest.mark.parametrize("modality", ["DM", "us"])
def test_default_spec_keeps_the_aspect_ratio_for_both_modalities(modality):
    # Squashing US crops erased the taller-than-wide cue (BI-RADS evidence): pad by default.
    assert default_spec(modality, 32) == PreprocessSpec(32, "pad")
    assert default_spec(modality, 32, "squash") == PreprocessSpec(32, "squash")


@pytest.mark.parametrize("resize", ["auto", "crop", ""])
def test_default_spec_rejects_unknown_resize_naming_the_key(resize):
    with pytest.raises(ConfigError, match=r"data\.resize.*pad.*squash"):
        default_spec("US", 32, resize)


def test_default_spec_rejects_unknown_modality_and_bad_size():
    with pytest.raises(ConfigError, match="MRI"):
        default_spec("MRI", 32)
    with pytest.raises(ConfigError, match=r"data\.size_us"):
        default_spec("US", 0)


def test_tall_us_crop_stays_tall_by_default():
    tall = np.ones((40, 20), dtype=np.float32)  # a taller-than-wide lesion crop
    out = preprocess(tall, default_spec("US", 32))
    rows, cols = np.nonzero(out)
    assert np.ptp(rows) + 1 == 32 and np.ptp(cols) + 1 == 16  # 2:1 kept, black side columns


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


# --- where the cache lives: read-only data folders --------------------------------------------


def _blocked(tmp_path: Path) -> Path:
    """A folder that can never be created: its parent is a regular file (works as root too)."""
    blocker = tmp_path / "readonly_mount"
    blocker.write_text("not a folder")
    return blocker / "cache"


@pytest.mark.parametrize("pool", ["serial", "thread", "process"])
def test_unwritable_cache_is_a_user_error_naming_folder_and_key(tmp_path, images, pool):
    root = _blocked(tmp_path)
    c = ImageCache(root)
    with pytest.raises(UserError, match=r"readonly_mount/cache.*data\.cache_dir") as err:
        if pool == "serial":
            c.get(images[0], PreprocessSpec(32))
        else:
            c.warm(images, PreprocessSpec(32), workers=2, pool=pool)
    assert "Not a directory" in str(err.value)  # the system's reason is kept


def test_read_only_mount_error_names_the_cache_folder(tmp_path, images, monkeypatch):
    import errno
    import tempfile

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", erofs)
    root = tmp_path / "cache"
    with pytest.raises(UserError, match="Read-only file system") as err:
        ImageCache(root).get(images[0], PreprocessSpec(32))
    assert str(root) in str(err.value) and "data.cache_dir" in str(err.value)


def test_complete_cache_is_readable_without_write_access(tmp_path, images, monkeypatch, decodes):
    import tempfile

    root = tmp_path / "cache"
    built, _ = ImageCache(root).load_many(images, PreprocessSpec(32))
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: pytest.fail("cache wrote a file"))
    again, rep = ImageCache(root).load_many(images, PreprocessSpec(32))
    assert rep.reused == 4 and len(decodes) == 4
    np.testing.assert_array_equal(built, again)


def test_default_cache_dir_beside_a_writable_manifest(tmp_path):
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("patient_id\n")
    got = default_cache_dir(manifest, fallback_dir=tmp_path / "run" / "cache")
    assert got == (tmp_path / "data" / ".cache").resolve() and got.is_dir()
    assert not (tmp_path / "run").exists()
    assert list(got.iterdir()) == []  # the write probe leaves nothing behind


def test_default_cache_dir_falls_back_when_the_data_folder_is_read_only(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    (data / ".cache").write_text("a file where the cache folder would go")
    fallback = tmp_path / "run" / "cache"
    got = default_cache_dir(data / "manifest.csv", fallback_dir=fallback)
    assert got == fallback.resolve() and got.is_dir()
    assert "not writable" in caplog.text and "data.cache_dir" in caplog.text
    with pytest.raises(UserError, match=r"data/\.cache.*data\.cache_dir"):
        default_cache_dir(data / "manifest.csv")
    with pytest.raises(UserError, match=r"readonly_mount/cache.*data\.cache_dir"):
        default_cache_dir(data / "manifest.csv", fallback_dir=_blocked(tmp_path))
