"""Output folders of ``roi train``/``roi crop`` that leave nothing behind, whatever happens.

:func:`build_dir` wraps :func:`breastfusion.io.atomic_dir` (build under ``.NAME.*.tmp``,
swap in when complete, replace only a folder holding our marker file) with two more
guarantees:

- SIGTERM (``kill``, a batch scheduler, a container stop) and SIGHUP become
  ``KeyboardInterrupt`` (SIGTERM: its subclass ``errors.Terminated``, exit 143 in the CLI)
  while the folder is being built, so the temporary folder, which for ``roi train`` holds a
  full copy of the detector's data set, is removed as on Ctrl-C. Only in the main thread,
  and only where nobody else installed a handler (``cli.main`` installs its own for SIGTERM,
  which does the same).
- SIGKILL cannot be caught: each temporary folder holds an owner file (pid and host), and the
  next run for the same output removes temporary folders whose owner process is gone. Folders
  without our owner file are never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from breastfusion.errors import Terminated
from breastfusion.io import atomic_dir

logger = logging.getLogger(__name__)

# Not fsguard's ownership marker (``.breastfusion-owner.json``): this one marks a build in
# progress and never reaches the finished folder.
OWNER_FILE = ".breastfusion-build.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(out_dir: Path) -> list[Path]:
    """Remove ``.NAME.*.tmp`` siblings of ``out_dir`` left by killed runs on this host."""
    if os.name != "posix" or not out_dir.parent.is_dir():
        return []  # os.kill(pid, 0) is not a liveness probe on Windows
    removed = []
    host = socket.gethostname()
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        owner = tmp / OWNER_FILE
        try:
            record = json.loads(owner.read_text(encoding="utf-8"))
            pid, same_host = int(record["pid"]), record.get("host") == host
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or still being created
        if same_host and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            logger.info("removed %s, left by an interrupted run (pid %d)", tmp, pid)
    return removed


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into ``Terminated``/``KeyboardInterrupt`` within the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        # A second signal must not interrupt the clean-up that this one starts.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM:
            raise Terminated(f"terminated by {name}")
        raise KeyboardInterrupt(f"terminated by {name}")

    previous: dict[signal.Signals, object] = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def build_dir(out_dir: str | os.PathLike, *, marker: str) -> Iterator[Path]:
    """Build ``out_dir`` in a temporary sibling that is removed on every exit path.

    ``marker`` is a file the block writes: an existing non-empty ``out_dir`` without it is
    refused (``OutputError``) before any work, so a command never deletes a folder it did
    not make.
    """
    out = Path(out_dir).absolute()
    remove_stale(out)
    with terminate_as_interrupt(), atomic_dir(out, owned_marker=marker) as tmp:
        owner = tmp / OWNER_FILE
        owner.write_text(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), encoding="utf-8"
        )
        yield tmp
        owner.unlink(missing_ok=True)
