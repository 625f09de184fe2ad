"""What the driver of one search knows while Tune runs (this process only; never pickled).

Tune pickles its callbacks, scheduler and searcher with the experiment and restores those
copies on ``--resume``; they reach the live run's state (the interrupt guard, the echo
function, the references of the fold pruner, MLflow) through ``current()``, which the driver
sets for the life of ``Tuner.fit()``. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breastfusion.distributed.objective import Reference
from breastfusion.errors import Terminated


class InterruptGuard:
    """First SIGINT or SIGTERM: stop like Tune's own Ctrl-C path (save the experiment state,
    stop the trials, return from ``fit``); a second one aborts at once.

    Tune installs its SIGINT handler when ``fit`` starts; ``adopt_tune_handler`` (called from a
    callback's ``setup``, i.e. after that) wraps it so that this guard hears every signal and
    SIGTERM takes the same graceful path.
    """

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.signum: int | None = None
        self._tune: Any = None
        self._saved: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        return 143 if self.signum == signal.SIGTERM else 130

    @property
    def name(self) -> str:
        return "SIGTERM" if self.signum == signal.SIGTERM else "SIGINT (Ctrl-C)"

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.getsignal(sig)
                signal.signal(sig, self._first)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def rearm(self) -> None:
        """Take the signals back after ``ray.init``: it installs its own SIGTERM handler (kill
        Ray, exit 1) and Ray's core worker a C-level one (print, then abort)."""
        if not self._saved:
            return
        handler = self._first if self.signum is None else self._abort
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def adopt_tune_handler(self) -> None:
        if not self._saved or self.signum is not None:
            return
        current = signal.getsignal(signal.SIGINT)
        if callable(current) and current != self._first:
            self._tune = current
        signal.signal(signal.SIGINT, self._first)

    def _first(self, signum: int, frame: Any) -> None:
        self.signum = signum
        tune_handler, self._tune = self._tune, None
        if tune_handler is None:  # not inside Tuner.fit (yet): stop at once
            self._abort(signum, frame)
        self.echo(
            f"{self.name}: stopping the trials and saving the search state; "
            "interrupt again to abort at once"
        )
        tune_handler(signal.SIGINT, frame)  # sets Tune's stop event (and resets SIGINT)
        signal.signal(signal.SIGINT, self._abort)
        signal.signal(signal.SIGTERM, self._abort)

    def _abort(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum
        if signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt()


@dataclass
class Session:
    out: Path
    folds: list[int]
    epochs: int
    n_trials: int
    base_config: dict[str, Any]
    echo: Callable[[str], None]
    guard: InterruptGuard
    started: float = field(default_factory=time.monotonic)
    references: dict[str, Reference] = field(default_factory=dict)
    stops: dict[str, str] = field(default_factory=dict)  # trial id → why it was stopped
    tracker: Any = None  # distributed.tracking.MlflowTracker when tracking is on
    on_trial_end: Callable[[str, bool], None] | None = None  # (trial, errored): disk trim


_CURRENT: Session | None = None


def current() -> Session | None:
    return _CURRENT


@contextlib.contextmanager
def active(session: Session) -> Iterator[Session]:
    global _CURRENT
    previous, _CURRENT = _CURRENT, session
    try:
        yield session
    finally:
        _CURRENT = previous
