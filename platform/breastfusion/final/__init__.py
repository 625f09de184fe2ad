"""``breastfusion final``: the chosen configuration → one calibrated model, a holdout
evaluation and a self-contained bundle (see ``final.run`` and ``final.bundle``).

Modules: ``settings`` (the ``final:`` block), ``choice`` (which trial), ``members`` (what the
folds provide), ``operating`` (the threshold), ``refit`` (the network), ``scoring``,
``evaluation``, ``export``/``card``/``bundle`` (the bundle), ``pipeline``/``writing``/``run``
(orchestration), ``cli`` (the command). Importing this package stays light (no torch).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FinalResult", "FinalSettings", "final_from_best", "final_model", "locate_best"]


def __getattr__(name: str) -> Any:
    if name in ("FinalResult", "final_from_best", "final_model"):
        from breastfusion.final import run

        return getattr(run, name)
    if name == "FinalSettings":
        from breastfusion.final.settings import FinalSettings

        return FinalSettings
    if name == "locate_best":
        from breastfusion.final.choice import locate_best

        return locate_best
    raise AttributeError(f"module 'breastfusion.final' has no attribute {name!r}")
