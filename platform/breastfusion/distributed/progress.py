"""Console progress of a search: one line per trial event instead of Tune's tables.

Tune's default reporter prints every reported metric of every fold in boxed tables. People
need: which trial (i of N) started, each finished fold's AUC, the best CV AUC so far, how long
is left, crashes and retries, and how each trial ended. Curves are in each fold's
``tensorboard/`` folder.

Kept in its own module because it subclasses ``ray.tune.Callback`` and is pickled with the
experiment, so ``--resume`` must import it by name. It holds counters only; the live run's
state (where to print, the interrupt guard, what happens when a trial ends) comes from
``session.current()``.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from breastfusion.distributed import session
from breastfusion.distributed.objective import COMPLETE, FOLD_DONE, METRIC, is_number


class Progress(Callback):
    def __init__(self, n_folds: int, epochs: int, n_trials: int, max_failures: int):
        self.n_folds, self.epochs, self.n_trials = n_folds, epochs, n_trials
        self.max_failures = max_failures
        self._iterations: dict[str, int] = {}  # trial id → epochs reported (this run)
        self._ended: set[str] = set()
        self._numbers: dict[str, int] = {}
        self._units = 0  # trial-epochs reported since this run started
        self._since = time.monotonic()

    # -- Tune callback interface --------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        self._iterations, self._ended, self._units = {}, set(), 0
        self._since = time.monotonic()
        s = session.current()
        if s is not None:
            s.guard.adopt_tune_handler()  # Tune installed its SIGINT handler by now

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(f"{self._tag(trial, trials)}: started")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        it = result.get("training_iteration")
        if isinstance(it, int):
            before = self._iterations.get(trial.trial_id)
            self._units += it - before if before is not None and it > before else 1
            self._iterations[trial.trial_id] = it
        k = result.get(FOLD_DONE)
        if k is None:
            return
        auc = result.get(f"auc/fold{int(k)}", math.nan)
        flag = ""
        if str(int(k)) in str(result.get("degenerate_folds", "")).split(";"):
            flag = f" DEGENERATE ({result.get('degenerate_reason') or 'see metrics.json'})"
        self._say(
            f"{self._tag(trial, trials)}: fold {int(k)} AUC {_f(auc)}{flag} "
            f"({result.get('folds_done', '?')}/{self.n_folds} folds, running CV AUC "
            f"{_f(result.get(METRIC))}){self._status(trials)}"
        )

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(
            f"{self._tag(trial, trials)}: crashed (failure {trial.num_failures} of at most "
            f"{self.max_failures} retried): {_error_line(trial)}; "
            f"restarting from its last finished fold"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended.add(trial.trial_id)
        self._say(
            f"{self._tag(trial, trials)}: FAILED after {trial.num_failures} failure(s): "
            f"{_error_line(trial)}\n    traceback: {trial.error_file or trial.path + '/error.txt'}"
        )
        self._trial_ended(trial, errored=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended.add(trial.trial_id)
        r = trial.last_result or {}
        done = int(r.get("folds_done", 0) or 0)
        if r.get(COMPLETE) == 1:
            sd = r.get("cv_auc_std")
            spread = f" ± {_f(sd)}" if is_number(sd) else ""
            how = f"finished: CV AUC {_f(r.get(METRIC))}{spread} over {done} folds"
            if r.get("degenerate_folds"):
                how += f" (DEGENERATE fold(s) {r['degenerate_folds']}: never chosen)"
        else:
            s = session.current()
            why = (s.stops.get(trial.trial_id) if s is not None else None) or "scheduler"
            how = f"stopped after {done}/{self.n_folds} folds by {why}"
        self._say(f"{self._tag(trial, trials)}: {how}{self._status(trials)}")
        self._trial_ended(trial)

    # -- lines ----------------------------------------------------------------------------------

    def _tag(self, trial: Any, trials: list | None = None) -> str:
        """``[i/N] name``: i counts trials in the order Tune created them."""
        if trials is not None and trial in trials:
            self._numbers.setdefault(trial.trial_id, trials.index(trial) + 1)
        i = self._numbers.get(trial.trial_id)
        return f"  [{i}/{self.n_trials}] {trial}" if i else f"  {trial}"

    def _status(self, trials: list) -> str:
        s = session.current()
        parts = []
        if s is not None and s.references:
            best = max(s.references.values(), key=lambda r: (r.score, r.trial))
            parts.append(f"best so far {_f(best.score)} ({best.trial.split('_')[0]})")
        ended = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))
        parts.append(f"{ended}/{self.n_trials} trials ended")
        eta = self._eta(trials)
        if eta is not None:
            parts.append(f"ETA ≤ {_duration(eta)}")
        return "  | " + ", ".join(parts)

    def _eta(self, trials: list) -> float | None:
        """An upper bound: the remaining trial-epochs if nothing else stopped early, at the
        rate measured since this run started (concurrency included)."""
        elapsed = time.monotonic() - self._since
        if self._units == 0 or elapsed <= 0:
            return None
        per_trial = self.n_folds * self.epochs
        left = 0
        for t in trials:
            if t.status in ("TERMINATED", "ERROR"):
                continue
            it = (t.last_result or {}).get("training_iteration") or 0
            left += max(0, per_trial - int(it))
        left += max(0, self.n_trials - len(trials)) * per_trial
        return left * elapsed / self._units

    def _trial_ended(self, trial: Any, errored: bool = False) -> None:
        s = session.current()
        if s is not None and s.on_trial_end is not None:
            s.on_trial_end(str(trial), errored)

    @staticmethod
    def _say(line: str) -> None:
        s = session.current()
        if s is not None:
            s.echo(line)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def _error_line(trial: Any) -> str:
    """The exception line of the trial's latest error (its traceback stays in error.txt)."""
    try:
        text = Path(trial.error_file).read_text(errors="replace")
    except (OSError, TypeError):
        return "see error.txt"
    # Tune heads each failure with 'Failure # N (occurred at ...)'.
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Failure #")
    ]
    typed = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln)]
    if typed:
        return typed[-1][:300]
    return lines[0][:300] if lines else "see error.txt"  # e.g. a worker that died


def _f(x: Any) -> str:
    try:
        return "n/a" if x is None or math.isnan(float(x)) else f"{float(x):.3f}"
    except (TypeError, ValueError):
        return "n/a"
