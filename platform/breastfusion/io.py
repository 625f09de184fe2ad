"""Small filesystem helpers: atomic writes, stable JSON, portable paths and CSV reading.

Every file a later stage trusts is written to a temporary name in the same folder and renamed
into place, so an interrupted run never leaves a half-written file behind. A write that the
system refuses (read-only disk, a file where a folder should be, no space) raises
:class:`~breastfusion.errors.OutputError` naming the path, which the CLI prints without a
traceback; it is also an ``OSError`` for callers that catch those.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion.errors import OutputError, UserError

if TYPE_CHECKING:
    import pandas as pd


def _output_error(path: str | os.PathLike, exc: OSError, what: str = "write") -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot {what} {os.fspath(path)}: {reason}")


def ensure_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p`` whose failures are user errors naming the folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot create folder {path}: a file of that name exists")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _output_error(path, exc, "create folder") from exc
    return path


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read by setting and restoring (not thread-safe)
    os.umask(mask)
    return mask


def shareable(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (0666/0777 minus the umask).

    ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 entries; renamed into place they would
    hide reports and models from colleagues on shared storage.
    """
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _output_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        shareable(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, UserError):
            raise _output_error(path, exc) from exc
        raise
    return path


def link_or_copy(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put ``source``'s content at ``dest`` atomically: a hard link where the file system
    allows (large weights that never change in place take no second copy), else a copy."""
    source, dest = Path(source), Path(dest)
    ensure_dir(dest.parent)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            shareable(tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        raise _output_error(dest, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Deterministic, valid JSON (``json_clean``ed: no bare NaN; sorted keys, fixed indent,
    trailing newline)."""
    text = json.dumps(
        json_clean(obj), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False
    )
    return text + "\n"


def json_clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf → null, numpy scalars → Python, paths → str. Floats keep full
    precision (Python's shortest repr round-trips exactly): a threshold of 4.5e-7 or a p-value
    of 9.04e-5 is stored as computed, never rounded to 0."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_clean(v) for v in obj]
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:  # np scalars
        obj = obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``json_clean(obj)``: valid JSON (no bare NaN), sorted keys, full precision."""
    return atomic_write_text(path, dumps_json(obj))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, owned_marker: str | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name; it appears at ``path`` only if the block succeeds.

    An existing ``path`` is replaced (the old folder is moved aside first and deleted only
    after the new one is in place). With ``owned_marker`` (a file name the block writes, e.g.
    ``"roi_summary.json"``) an existing non-empty folder *without* that file is refused
    before any work: a user's ``--out .`` must never delete their data. On failure the
    temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write folder {path}: a file of that name exists")
    if owned_marker and path.is_dir() and any(path.iterdir()):
        if not (path / owned_marker).is_file():
            raise OutputError(
                f"refusing to replace {path}: the folder is not empty and holds no "
                f"{owned_marker} from an earlier run of this command; choose a new or "
                "empty output folder"
            )
    ensure_dir(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise _output_error(path, exc) from exc
    shareable(tmp, folder=True)
    try:
        yield tmp
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    old = None
    try:
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as exc:
        if old is not None and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise _output_error(path, exc) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def relative_ref(target: str | os.PathLike, start: str | os.PathLike) -> str:
    """``target`` relative to folder ``start``, climbing with ``..`` if needed (POSIX
    separators), for references resolved against the folder of the file that stores them
    (config paths, provenance, ``source_path``). Absolute only where no relative path exists
    (another drive)."""
    try:
        return Path(os.path.relpath(os.path.abspath(target), os.path.abspath(start))).as_posix()
    except ValueError:
        return Path(os.path.abspath(target)).as_posix()


def portable_path(target: str | os.PathLike, start: str | os.PathLike) -> str:
    """``target`` as a manifest in folder ``start`` should store it (POSIX separators).

    Inside ``start``: relative, so the folder can move. Outside: absolute, because
    ``load_manifest`` refuses relative paths that climb out with ``..`` and another drive
    has no relative path at all. Never contains ``..``.
    """
    rel = relative_ref(target, start)
    if rel == os.pardir or rel.startswith(os.pardir + "/"):
        return Path(os.path.abspath(target)).as_posix()
    return rel


def _default_na_values() -> list[str]:
    try:
        from pandas._libs.parsers import STR_NA_VALUES

        return sorted(STR_NA_VALUES)
    except ImportError:  # pragma: no cover - private location moved
        return ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                "nan", "null"]  # fmt: skip


def read_csv_table(
    path: str | os.PathLike,
    *,
    what: str = "CSV file",
    str_columns: Sequence[str] = ("patient_id",),
) -> pd.DataFrame:
    """Read a CSV with pandas; ``str_columns`` stay verbatim strings, failures are user errors.

    Patient ids keep leading zeros (``"007"``) and ``"NA"``/``"null"`` stay ids, not missing
    values (an empty cell is ``""``); other columns are parsed as pandas does by default.
    A missing file, a folder, an unreadable, empty, non-UTF-8 or malformed file raises
    ``UserError`` naming the file and ``what`` it should have been.
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if not path.is_file():
        raise UserError(f"{path}: {what} is not a regular file")
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
        keep = [c for c in header if c in str_columns]
        na = _default_na_values()
        return pd.read_csv(
            path,
            dtype={c: str for c in keep},
            keep_default_na=False,
            na_values={c: na for c in header if c not in keep},
        )
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {what} is not UTF-8 text ({exc.reason})") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: {what} is empty (no header line)") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise UserError(f"{path}: cannot read {what} as CSV ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(dumps_json(obj).encode("utf-8")).hexdigest()
