"""Trial names that say the configuration, e.g. ``t00003_bdm=resnet18_head=sum_lr=3.2e-04``.

Shared by Tune (trial folder names), the Optuna searcher (a ``trial`` attribute on each Optuna
trial, so the dashboard and ``trials.csv`` name the same thing) and MLflow (run names).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_NAME_KEYS = {
    "optim.lr": "lr",
    "optim.batch_size": "bs",
    "optim.weight_decay": "wd",
    "data.size_dm": "dm",
    "data.size_us": "us",
    "model.backbone_dm": "bdm",
    "model.backbone_us": "bus",
    "model.fusion": "head",
    "augment.strength": "aug",
    "augment.elastic": "el",
}


def trial_name_for(trial_id: str, config: Mapping[str, Any] | None) -> str:
    """Grid/random: the trial's number (``t00003``); Optuna: the same scheme; then the
    sampled values, shortened."""
    tid = str(trial_id or "")
    m = re.fullmatch(r"[0-9a-f]+_(\d+)", tid)
    parts = [f"t{int(m.group(1)):05d}" if m else tid[:8]]
    for key, value in sorted((config or {}).items()):
        short = _NAME_KEYS.get(key, key.rsplit(".", 1)[-1])
        if isinstance(value, float):
            text = f"{value:.1e}" if abs(value) < 0.01 else f"{value:.3g}"
        else:
            text = str(value)
        parts.append(f"{short}={text}")
    return re.sub(r"[^A-Za-z0-9=._+-]", "", "_".join(parts))[:120]


def trial_name(trial: Any) -> str:
    """Tune's ``trial_name_creator`` / ``trial_dirname_creator``."""
    return trial_name_for(trial.trial_id, trial.config)
