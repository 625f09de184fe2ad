"""An output folder that is claimed, locked, and published only when complete.

``final`` and ``predict`` write into a staging folder inside their output folder and move the
finished entries into place at the end, the completion record (``done``) last. Before that
the folder holds what the previous complete run left (or nothing), never a mix: a crash or an
interrupt removes the staging folder, and a folder this run created is removed again. The
folder is claimed (``fsguard.claim``: never a folder another command or the user filled) and
locked for the command's life (``fsguard.FolderLock``: one writer at a time).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from breastfusion.fsguard import OWNER_FILE, FolderLock, claim
from breastfusion.io import shareable

STAGING = ".staging.tmp"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(staging: Path, out: Path, names: Sequence[str], done: str) -> None:
    """Replace ``out``'s entries ``names`` with the staged ones; ``done`` goes in last."""
    with contextlib.suppress(FileNotFoundError):
        (out / done).unlink()  # from here on the folder does not look finished
    staged = {p.name for p in staging.iterdir()}
    for name in [n for n in names if n != done] + [done]:
        target = out / name
        if name in staged:
            _remove(target)
            os.replace(staging / name, target)
        elif name != done:
            _remove(target)  # an output of an earlier run that this run did not make
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_output(
    out: str | os.PathLike,
    kind: str,
    names: Sequence[str],
    done: str,
    *,
    overwrite: bool = False,
) -> Iterator[Path]:
    """``with staged_output(out, "final", NAMES, "final.json") as staging:`` write there."""
    out = Path(out)
    created = not out.exists()
    claim(out, kind, overwrite=overwrite)
    ok = False
    try:
        with FolderLock(out, kind):
            staging = out / STAGING
            _remove(staging)
            staging.mkdir()
            shareable(staging, folder=True)
            try:
                yield staging
                publish(staging, out, names, done)
                ok = True
            finally:
                if not ok:
                    shutil.rmtree(staging, ignore_errors=True)
    finally:
        if not ok and created and _only_ours(out):
            shutil.rmtree(out, ignore_errors=True)


def _only_ours(folder: Path) -> bool:
    from breastfusion.fsguard import LOCK_FILE

    return folder.is_dir() and all(p.name in (OWNER_FILE, LOCK_FILE) for p in folder.iterdir())
