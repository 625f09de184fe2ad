"""One writer per output folder, and nothing touched that a command did not make.

``FolderLock(folder)``: an exclusive advisory lock (``fcntl.flock`` on ``folder/.breastfusion.lock``,
as pip and git guard their own folders) held for the life of a command. A second writer is
refused at once with the holder's pid, start time and command. The kernel drops the lock when
its process dies, so a stale lock (dead pid) is simply taken over. The lock file is left in
place on release: unlinking it would let two later writers lock two different files.

``claim(folder, kind)``: a command writes into a folder only when the folder is new or empty,
or already carries its ownership marker (``.breastfusion-owner.json``) for the same kind of
output; a folder holding foreign files is refused unless the caller passes ``overwrite=True``
(the user's explicit ``--overwrite``). Commands then delete only what they made.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from breastfusion.errors import OutputError, UserError
from breastfusion.io import atomic_write_json, ensure_dir, shareable

LOCK_FILE = ".breastfusion.lock"
OWNER_FILE = ".breastfusion-owner.json"
# Names a folder may hold without counting as "foreign" (ours, or OS litter).
_HARMLESS = {LOCK_FILE, OWNER_FILE, ".DS_Store"}


class FolderBusy(UserError):
    """Another process holds the folder's lock."""


class FolderLock:
    """``with FolderLock(out, "search"):`` — refuse a second writer of ``out`` at once."""

    def __init__(self, folder: str | os.PathLike, what: str = "output") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def acquire(self) -> FolderLock:
        import fcntl

        ensure_dir(self.folder)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"cannot lock {self.folder}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderBusy(
                f"{self.folder} is in use by another breastfusion process ({holder}); wait "
                f"for it to finish or stop it — two writers of one {self.what} folder would "
                "overwrite each other's work"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"cannot lock {self.folder}: {exc.strerror or exc}") from exc
        shareable(self.path)
        info = {
            "pid": os.getpid(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "pid unknown"
    parts = [f"pid {info['pid']}"]
    if info.get("started"):
        parts.append(f"started {info['started']}")
    if info.get("command"):
        parts.append(f"command: {info['command']}")
    return ", ".join(parts)


def owner(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's ownership record, or None when it has none (or an unreadable one)."""
    path = Path(folder) / OWNER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """Names in ``folder`` that no breastfusion command put there (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in _HARMLESS)


def claim(folder: str | os.PathLike, kind: str, *, overwrite: bool = False) -> Path:
    """Make ``folder`` this command's output folder for ``kind`` (create it if needed).

    Accepted: a missing or empty folder, or one whose marker says ``kind``. Refused with a
    ``UserError`` naming the folder: a folder owned by another kind of output, or a non-empty
    folder without a marker (unless ``overwrite``: the user said so explicitly).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot use {folder} as an output folder: it is a file")
    record = owner(folder)
    if record is not None and record.get("kind") != kind:
        raise UserError(
            f"{folder} holds a breastfusion {record.get('kind', 'output')} folder, not a {kind} "
            "folder; choose another output folder"
        )
    if record is None:
        foreign = foreign_entries(folder)
        if foreign and not overwrite:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            )
            raise UserError(
                f"{folder} is not empty ({shown}) and was not made by breastfusion {kind}; "
                "choose a new or empty folder (or pass --overwrite to write into it anyway)"
            )
        ensure_dir(folder)
        atomic_write_json(
            folder / OWNER_FILE,
            {
                "kind": kind,
                "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            },
        )
    return folder


def owns(folder: str | os.PathLike, kind: str) -> bool:
    record = owner(folder)
    return record is not None and record.get("kind") == kind
