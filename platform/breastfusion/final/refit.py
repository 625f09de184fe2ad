"""The exported network: a refit on every development patient, or the fold ensemble.

Both end as a :class:`breastfusion.models.ensemble.CalibratedEnsemble`: the refit is one
member carrying the mean of the fold calibrations (its threshold is transferred from the
fold models, not fitted on it: it has no validation fold), the ensemble is the K fold models,
each with its own calibration. Datasets, loaders and the training loop are the engine's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from breastfusion.errors import SplitError, UserError
from breastfusion.evaluate.calibration import Calibration
from breastfusion.final.members import (
    TRANSFERRED,
    FoldFacts,
    load_member,
    refit_calibration,
    refit_epochs,
)

if TYPE_CHECKING:
    from torch import nn

    from breastfusion.config import Config
    from breastfusion.engine.data import Cohort

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass
class Trained:
    model: nn.Module  # a CalibratedEnsemble, CPU, eval mode
    config: Config  # what the members were trained with
    mode: str
    train_patients: list[str]  # every patient whose images trained a member
    excluded: dict[str, str]  # training patients left out (missing modality), with why
    calibrations: list[Calibration]
    training: dict[str, Any]  # facts for metadata.json


def check_no_leak(train_patients: Sequence[str], holdout: Sequence[str]) -> None:
    """Refuse a model whose training patients include a holdout patient (never expected:
    the splits are checked on read; this guards the code path that built the training set)."""
    leaked = sorted(set(train_patients) & set(holdout))
    if leaked:
        raise SplitError(
            f"{len(leaked)} holdout patient(s) would be in the final model's training data: "
            + ", ".join(leaked[:10])
        )


def training_patients(cfg: Config, cohort: Cohort) -> list[str]:
    """All development patients (``data.max_patients`` keeps a class-balanced subset: debug)."""
    from breastfusion.data.splits import subsample_patients

    ids = list(cohort.splits.development)
    if cfg.data.max_patients is not None:
        ids = subsample_patients(ids, cohort.labels(), cfg.data.max_patients, cfg.optim.seed)
    return ids


def refit(
    cfg: Config,
    cohort: Cohort,
    facts: Sequence[FoldFacts],
    *,
    epochs: int | None,
    device: str | None,
    say: Progress,
) -> Trained:
    """Train ``cfg`` on every development patient, no validation fold, for the fold-derived
    (or given) number of epochs; wrap it with the mean fold calibration."""
    from breastfusion.engine.data import build_dataset, build_loader
    from breastfusion.engine.loop import fit
    from breastfusion.engine.progress import EpochProgress
    from breastfusion.final.bundle import build_untrained
    from breastfusion.models.ensemble import CalibratedEnsemble

    if epochs is None:
        n_epochs, rule = refit_epochs(facts, cfg.optim.epochs)
    else:
        n_epochs, rule = int(epochs), "given explicitly (final.epochs)"
    fit_cfg = cfg.with_overrides({"optim.epochs": n_epochs})
    ids = training_patients(cfg, cohort)
    ds = build_dataset(fit_cfg, cohort.table, ids, train=True)
    if len(ds) == 0:
        raise UserError(f"no training samples for modality {cfg.data.modality!r}")
    say(
        f"refit on {len(ds.patients)} development patients ({len(ds)} samples), {n_epochs} "
        f"epochs ({rule})"
    )
    model = build_untrained(fit_cfg)
    shown = EpochProgress(say, n_epochs, label="refit")
    try:
        result = fit(
            fit_cfg,
            build_loader(fit_cfg, ds, train=True),
            None,
            model,
            callback=shown.on_epoch,
            device=device,
            heartbeat=shown.heartbeat,
        )
    finally:
        shown.close()
    cal = refit_calibration(facts) if facts else Calibration(note="no fold calibration")
    wrapped = CalibratedEnsemble([model.cpu().eval()], [cal.a], [cal.b], cfg.branches).eval()
    facts_out = {"epochs": n_epochs, "epochs_rule": rule, **_fit_facts(result, ds)}
    return Trained(
        model=wrapped,
        config=fit_cfg,
        mode="refit",
        train_patients=list(ds.patients),
        excluded=dict(ds.excluded),
        calibrations=[cal],
        training={**facts_out, "calibration": TRANSFERRED if facts else cal.note},
    )


def _fit_facts(result: Any, ds: Any) -> dict[str, Any]:
    return {
        "epochs_run": result.epochs_run,
        "stop_reason": result.stop_reason,
        "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
        "samples": len(ds),
        "patients": len(ds.patients),
    }


def ensemble(cfg: Config, cohort: Cohort, facts: Sequence[FoldFacts], *, say: Progress) -> Trained:
    """The chosen trial's K fold models, each with its own validation-fold calibration."""
    from breastfusion.models.ensemble import CalibratedEnsemble

    if not facts:
        raise UserError("final.mode ensemble needs the chosen trial's fold folders; none found")
    members, train_ids = [], set()
    for f in facts:
        model, member_cfg = load_member(f, cfg)
        members.append(model)
        # A fold model trained on the development patients outside its validation fold.
        train_ids.update(cohort.splits.train_val(member_cfg.data.fold)[0])
    cals = [f.calibration for f in facts]
    say(f"ensemble of {len(members)} fold models (folds {', '.join(str(f.k) for f in facts)})")
    model = CalibratedEnsemble(members, [c.a for c in cals], [c.b for c in cals], cfg.branches)
    return Trained(
        model=model.eval(),
        config=cfg,
        mode="ensemble",
        train_patients=sorted(train_ids),
        excluded={},
        calibrations=cals,
        training={
            "folds": [f.k for f in facts],
            "rule": "mean of the fold models' calibrated malignant log-odds (each fold model "
            "Platt-calibrated on its own validation fold)",
            "reported_epochs": [f.reported_epoch for f in facts],
        },
    )
