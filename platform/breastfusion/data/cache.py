"""Offline preprocessing with a content-keyed uint8 cache.

Preprocessing (min-max normalise → pad/squash to square → resize → uint8) is deterministic, so it
runs once per source image and setting and is stored; training only ever reads the stored uint8
arrays. Augmentation is random and therefore never cached (see ``augment.py``).

An entry is keyed by the source file's identity (absolute path, size in bytes, mtime in ns) and
by the preprocessing parameters (``PreprocessSpec``, which carries ``PREPROCESS_VERSION``), hashed
with sha256. Editing or replacing a source image, changing a size, or changing the algorithm
(bump ``PREPROCESS_VERSION``) each yields a new key, so a stale entry is never served.

Entry file layout (``<root>/<spec hash[:16]>/<key[:2]>/<key>.u8``)::

    b"BFC1" | uint32 height | uint32 width | 32-byte sha256 of payload | payload (H*W uint8)

Entries are written to a temporary file and renamed into place (``breastfusion.io``), so a
killed run leaves at most a ``.*.tmp`` file that no lookup ever opens. The payload checksum also
catches an entry damaged later (truncated copy, disk trouble): such an entry is rebuilt.

Where the cache lives: ``data.cache_dir`` when set, else ``default_cache_dir(manifest)``, a
``.cache`` folder beside the manifest when that folder can be written, else a fallback the
caller names (the engine passes one under the run's output), so a read-only data mount works
without configuration. A cache folder that cannot be written when an entry must be built is a
``UserError`` naming the folder and ``data.cache_dir``. Reading a complete cache needs no write
access, so a pre-built cache on a read-only mount can be shared via ``data.cache_dir``.

The preprocessing itself (``PreprocessSpec``, ``preprocess``, ``default_spec``) lives in
``preprocess.py`` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from breastfusion.data.preprocess import (
    PREPROCESS_VERSION,
    RESIZE_MODES,
    PreprocessSpec,
    ResizeMode,
    default_spec,
    preprocess,
)
from breastfusion.errors import ImageError, OutputError
from breastfusion.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

PoolKind = Literal["thread", "process"]
CACHE_DIR_NAME = ".cache"

_MAGIC = b"BFC1"
_HEADER = struct.Struct("<4sII32s")  # magic, height, width, sha256(payload)


def unwritable_cache_error(root: str | os.PathLike, exc: BaseException) -> OutputError:
    """The one message for a cache folder that cannot be written (names folder and key)."""
    # breastfusion.io wraps the system error; its cause carries the plain reason.
    cause = exc.__cause__ if isinstance(exc, OutputError) and exc.__cause__ else exc
    reason = getattr(cause, "strerror", None) or str(cause)
    return OutputError(
        f"cannot write the preprocessing cache folder {os.fspath(root)} ({reason}); set "
        "data.cache_dir to a writable folder"
    )


def _writable_dir(path: Path) -> bool:
    """Create ``path`` if needed and prove a file can be made in it (``os.access`` is not
    enough: it ignores some read-only mounts and ACLs)."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return True


def default_cache_dir(
    manifest_path: str | os.PathLike, fallback_dir: str | os.PathLike | None = None
) -> Path:
    """Where the cache goes when ``data.cache_dir`` is not set.

    ``<manifest folder>/.cache`` when it can be written (created if missing, so runs on the
    same data share one cache); otherwise ``fallback_dir`` (created; the engine passes a folder
    under the run's output), with a warning, because that cache is not shared between runs.
    Without a fallback an unwritable folder is an ``OutputError`` naming it and
    ``data.cache_dir``. To reuse a pre-built cache on a read-only mount, set
    ``data.cache_dir`` to it explicitly (reads need no write access).
    """
    beside = Path(manifest_path).resolve().parent / CACHE_DIR_NAME
    if _writable_dir(beside):
        return beside
    if fallback_dir is None:
        raise unwritable_cache_error(beside, PermissionError("not writable"))
    fallback = Path(fallback_dir).resolve()
    if not _writable_dir(fallback):
        raise unwritable_cache_error(fallback, PermissionError("not writable"))
    log.warning(
        "preprocessing cache: %s is not writable; using %s (set data.cache_dir to share a "
        "cache between runs)",
        beside,
        fallback,
    )
    return fallback


def _source_identity(path: str | os.PathLike) -> dict[str, int | str]:
    abs_path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(abs_path)
    except OSError as exc:
        raise ImageError(f"cannot read image {abs_path}: {exc.strerror or exc}") from exc
    return {"path": abs_path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(path: str | os.PathLike, spec: PreprocessSpec) -> str:
    """sha256 over the source identity and the preprocessing parameters."""
    from breastfusion.io import sha256_json

    return sha256_json({"source": _source_identity(path), "preprocess": spec.to_dict()})


def _encode(arr: np.ndarray) -> bytes:
    payload = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(_MAGIC, arr.shape[0], arr.shape[1], digest) + payload


def _decode(data: bytes, expect_side: int) -> np.ndarray | None:
    """The entry's array, or None if it is not a complete, intact entry of the expected shape."""
    if len(data) < _HEADER.size:
        return None
    magic, h, w, digest = _HEADER.unpack_from(data)
    payload = memoryview(data)[_HEADER.size :]
    if magic != _MAGIC or (h, w) != (expect_side, expect_side) or len(payload) != h * w:
        return None
    if hashlib.sha256(payload).digest() != digest:
        return None
    return np.frombuffer(data, dtype=np.uint8, offset=_HEADER.size).reshape(h, w)


@dataclass
class WarmReport:
    """What a cache pass did: ``decoded`` images were read from source (including ``corrupt``
    entries that had to be rebuilt); ``reused`` came from the cache without decoding."""

    decoded: int = 0
    reused: int = 0
    corrupt: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.decoded + self.reused

    def add(self, status: str) -> None:
        if status == "reused":
            self.reused += 1
        else:
            self.decoded += 1
            if status == "corrupt":
                self.corrupt += 1

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)

    def __str__(self) -> str:
        extra = f", {self.corrupt} corrupt rebuilt" if self.corrupt else ""
        return (
            f"{self.total} images: {self.decoded} decoded, {self.reused} reused{extra} "
            f"({self.seconds:.1f} s)"
        )


class ImageCache:
    """A directory of preprocessed uint8 images; safe to share between runs and processes.

    Concurrent writers of the same entry are harmless: both write identical bytes to private
    temporary files and the last rename wins.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ImageCache({str(self.root)!r})"

    def spec_dir(self, spec: PreprocessSpec) -> Path:
        return self.root / spec.hash[:16]

    def entry_path(self, path: str | os.PathLike, spec: PreprocessSpec) -> Path:
        key = cache_key(path, spec)
        return self.spec_dir(spec) / key[:2] / f"{key}.u8"

    def _get(self, path: str | os.PathLike, spec: PreprocessSpec) -> tuple[np.ndarray, str]:
        entry = self.entry_path(path, spec)
        status = "decoded"
        try:
            data = entry.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # the latter: a file blocks the folder
            data = None
        if data is not None:
            arr = _decode(data, spec.size)
            if arr is not None:
                return arr, "reused"
            log.warning("cache entry %s is damaged; rebuilding it from %s", entry, path)
            status = "corrupt"
        # Resolved at call time (not bound at import) so tests can count decodes.
        from breastfusion.data import imaging

        arr = preprocess(imaging.load_normalised(path), spec)
        try:
            self._write_spec(spec)
            atomic_write_bytes(entry, _encode(arr))
        except OSError as exc:  # OutputError from breastfusion.io is an OSError too
            raise unwritable_cache_error(self.root, exc) from exc
        return arr, status

    def _write_spec(self, spec: PreprocessSpec) -> None:
        # A human-readable record of what a spec folder holds; written once per folder.
        meta = self.spec_dir(spec) / "spec.json"
        if not meta.exists():
            atomic_write_json(meta, {"preprocess": spec.to_dict(), "hash": spec.hash})

    def get(self, path: str | os.PathLike, spec: PreprocessSpec) -> np.ndarray:
        """The preprocessed image (read-only uint8, ``spec.size`` square), built if needed."""
        return self._get(path, spec)[0]

    def warm(
        self,
        paths: Iterable[str | os.PathLike],
        spec: PreprocessSpec,
        *,
        workers: int = 0,
        pool: PoolKind = "thread",
    ) -> WarmReport:
        """Make sure every image has an entry; ``workers > 0`` builds entries in parallel.

        ``pool="thread"`` (default): decoding (Pillow/zlib, pydicom's pixel handlers), resizing
        (OpenCV) and hashing release the GIL, so threads scale on the cores without the costs
        of processes. ``pool="process"``: a ``spawn`` process pool (not ``fork``: callers often
        already hold torch/OpenCV thread pools, which a forked child can deadlock on); spawn
        re-imports the caller's ``__main__``, so scripts need an ``if __name__ == "__main__"``
        guard.
        """
        unique = list(dict.fromkeys(os.fspath(p) for p in paths))
        report = WarmReport()
        t0 = time.perf_counter()
        if workers > 0 and len(unique) > 1:
            if pool == "process":
                import multiprocessing

                ctx = multiprocessing.get_context("spawn")
                chunk = max(1, len(unique) // (workers * 8))
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
                    n = len(unique)
                    statuses = list(
                        ex.map(_warm_one, [str(self.root)] * n, unique, [spec] * n, chunksize=chunk)
                    )
            elif pool == "thread":
                with ThreadPoolExecutor(max_workers=workers) as ex:
                    statuses = list(ex.map(lambda p: self._get(p, spec)[1], unique))
            else:
                raise ValueError(f"pool must be 'thread' or 'process', got {pool!r}")
            for status in statuses:
                report.add(status)
        else:
            for p in unique:
                report.add(self._get(p, spec)[1])
        report.seconds = time.perf_counter() - t0
        log.info(
            "preprocessing cache %s (size %d, %s): %s", self.root, spec.size, spec.resize, report
        )
        return report

    def load_many(
        self,
        paths: Sequence[str | os.PathLike],
        spec: PreprocessSpec,
        *,
        workers: int = 0,
        pool: PoolKind = "thread",
    ) -> tuple[np.ndarray, WarmReport]:
        """Stack the preprocessed images of ``paths`` (in order) into one (N, S, S) uint8 array.

        One contiguous array (rather than N small ones) keeps DataLoader workers cheap: a
        forked worker shares its pages copy-on-write, and there is one refcount to touch.
        """
        paths = [os.fspath(p) for p in paths]
        out = np.empty((len(paths), spec.size, spec.size), dtype=np.uint8)
        if workers > 0:
            report = self.warm(paths, spec, workers=workers, pool=pool)
            for i, p in enumerate(paths):
                out[i] = self._get(p, spec)[0]
            return out, report
        report = WarmReport()
        t0 = time.perf_counter()
        seen: dict[str, int] = {}
        for i, p in enumerate(paths):
            if p in seen:
                out[i] = out[seen[p]]
                continue
            arr, status = self._get(p, spec)
            report.add(status)
            out[i] = arr
            seen[p] = i
        report.seconds = time.perf_counter() - t0
        log.info(
            "preprocessing cache %s (size %d, %s): %s", self.root, spec.size, spec.resize, report
        )
        return out, report


def _warm_one(root: str, path: str, spec: PreprocessSpec) -> str:
    """Process-pool task: build one entry, return its status (arrays stay on disk)."""
    try:
        import cv2

        cv2.setNumThreads(1)  # the pool is the parallelism; avoid oversubscribing cores
    except ImportError:  # pragma: no cover - cv2 is a hard dependency via albumentations
        pass
    return ImageCache(root)._get(path, spec)[1]


def warm_cache(
    root: str | os.PathLike,
    paths: Iterable[str | os.PathLike],
    spec: PreprocessSpec,
    *,
    workers: int = 0,
    pool: PoolKind = "thread",
) -> WarmReport:
    """Convenience wrapper: ``ImageCache(root).warm(paths, spec, workers=..., pool=...)``."""
    return ImageCache(root).warm(paths, spec, workers=workers, pool=pool)


__all__ = [
    "CACHE_DIR_NAME",
    "PREPROCESS_VERSION",
    "RESIZE_MODES",
    "ImageCache",
    "PreprocessSpec",
    "ResizeMode",
    "WarmReport",
    "cache_key",
    "default_cache_dir",
    "default_spec",
    "preprocess",
    "unwritable_cache_error",
    "warm_cache",
]
