"""A grid versus Optuna + pruning on the synthetic cohort: best CV AUC of each and the ratio of
trial-epochs they spent (goal: Optuna + pruning within 0.01 CV AUC of the grid's best with at
most 0.30 of its trial-epochs).

Both searches run the platform's own path (``breastfusion.distributed.search.search``) over
the same K patient-level folds and the same fixed settings (cosine schedule, one (DM, US) pair
per patient per epoch), one trial at a time on every core:

* grid:   every (lr, fusion head, batch size) point, each trained K folds × E epochs, no
          early stopping (``scheduler: none``: what a comparison table does);
* optuna: ``--optuna-trials`` trials over the same ranges (lr log-uniform between the grid's
          extremes, the same heads and batch sizes; TPE models the results after a quarter of
          the trials), with fold pruning between folds (``fold_margin`` 0.01: the forgiving,
          paired rule of ``objective.fold_pruning_verdict``) and ASHA over the trial's epochs
          (grace ``--grace-period`` trial-epochs, default two folds': ASHA ranks running CV
          means, and one fold's AUC on a few dozen patients is mostly noise).

A trial-epoch is one epoch of one fold of one trial (one Tune result; ``trials.csv``'s
``trial_epochs``). Each search's best is the project's rule (``best.json``). The measurement's
own noise is printed next to the gap: ``cv_auc_se``, the median standard error of a grid
trial's CV mean (fold SD / sqrt(K)), and ``signal_to_noise``, the SD of the grid's CV means
over that. Near 1 the grid's configurations differ by no more than their noise: the "best" is
the luckiest draw (the top of 20 equal configurations lies ~1.9 standard errors above their
mean), and a gap goal smaller than the standard error cannot be judged on that setting; it
needs more validation patients or a longer training where the settings matter. Measured in one
run; nothing is asserted. The last line is JSON.

    python benchmarks/search_efficiency.py                  # ~20 min on 2 CPU cores
    python benchmarks/search_efficiency.py --patients 600 --size 64 --epochs 6 --folds 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def make_cohort(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import make_splits, write_splits
    from breastfusion.data.synthetic import generate_cohort
    from breastfusion.io import sha256_file

    manifest = generate_cohort(
        root / "cohort",
        n_patients=args.patients,
        seed=args.seed,
        size=args.size,
        difficulty=args.difficulty,
    )
    df = load_manifest(manifest)
    splits = make_splits(
        df, folds=args.folds, holdout=0.0, seed=args.seed, manifest_sha256=sha256_file(manifest)
    )
    return manifest, write_splits(splits, root / "splits.json")


def run(raw: dict, manifest: Path, splits: Path, out: Path, folds: int) -> dict:
    from breastfusion.distributed.search import search
    from breastfusion.distributed.space import parse_space

    start = time.perf_counter()
    summary = search(parse_space(raw), manifest, splits, out, echo=lambda line: None)
    seconds = time.perf_counter() - start
    table = summary.trials
    complete = table[table["status"] == "complete"]
    stopped = table[table["status"] == "stopped"]
    return {
        "trials": len(table),
        "trials_complete": len(complete),
        "stopped_by_fold_pruning": int(
            stopped["stopped_by"].astype(str).str.startswith("fold pruning").sum()
        ),
        "stopped_by_asha": int(stopped["stopped_by"].astype(str).str.startswith("ASHA").sum()),
        "trial_epochs": int(table["trial_epochs"].sum()),
        "cv_auc_se": float((complete["std_auc"] / math.sqrt(folds)).median())
        if len(complete)
        else math.nan,
        "aucs": sorted(round(float(a), 4) for a in complete["mean_auc"]),
        "best_cv_auc": summary.best.get("score", math.nan),
        "best_config": summary.best.get("config", {}),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--heads", nargs="+", default=["sum", "concat"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--optuna-trials", type=int, default=10)
    parser.add_argument(
        "--pairs-per-patient",
        type=int,
        default=1,
        help="data.pairs_per_patient for training (0: every pair each epoch)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA's, in trial-epochs (default: two folds' epochs, one fold's with 2 folds; "
        "at 1, and at one fold's, the first fold's noisy AUC on 60 patients stopped 9 of 10 "
        "trials and the best was missed by 0.09)",
    )
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--difficulty", default="easy", choices=["easy", "standard", "hard"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.grace_period is None:
        args.grace_period = args.epochs * min(2, args.folds - 1)

    fixed = {
        "data.modality": "fusion",
        "data.size_dm": args.size,
        "data.size_us": args.size,
        "data.num_workers": 0,
        "optim.epochs": args.epochs,
        "optim.patience": 0,
        "data.pairs_per_patient": args.pairs_per_patient or None,
        "optim.schedule": "cosine",
        "model.pretrained": "none",
        "train.device": args.device,
    }
    common = {
        "max_failures": 0,
        "max_concurrent_trials": 1,
        "resources": {"cpu": os.cpu_count() or 1, "gpu": 1 if args.device == "cuda" else 0},
        "seed": args.seed,
        "fixed": fixed,
    }
    grid = {
        **common,
        "name": "grid",
        "algorithm": "grid",
        "num_samples": 1,
        "scheduler": "none",
        "space": {
            "optim.lr": {"grid": args.lrs},
            "model.fusion": {"grid": args.heads},
            "optim.batch_size": {"grid": args.batch_sizes},
        },
    }
    optuna = {
        **common,
        "name": "optuna",
        "algorithm": "optuna",
        "num_samples": args.optuna_trials,
        "scheduler": {
            "type": "asha",
            "grace_period": args.grace_period,
            "reduction_factor": args.reduction_factor,
            "fold_pruning": True,
            "fold_margin": 0.01,
        },
        "space": {
            "optim.lr": {"loguniform": [min(args.lrs), max(args.lrs)]},
            "model.fusion": {"choice": args.heads},
            "optim.batch_size": {"choice": args.batch_sizes},
        },
    }
    with tempfile.TemporaryDirectory(prefix="bf-efficiency-") as tmp:
        root = Path(tmp)
        manifest, splits = make_cohort(root, args)
        g = run(grid, manifest, splits, root / "grid", args.folds)
        o = run(optuna, manifest, splits, root / "optuna", args.folds)
    ratio = o["trial_epochs"] / g["trial_epochs"]
    print(
        f"grid:          {g['trials']} trials, {g['trial_epochs']} trial-epochs, "
        f"best CV AUC {g['best_cv_auc']:.3f} {g['best_config']} ({g['seconds']:.0f} s)"
    )
    print(
        f"optuna + pruning: {o['trials']} trials ({o['trials_complete']} ran every fold, "
        f"{o['stopped_by_asha']} stopped by ASHA, {o['stopped_by_fold_pruning']} by fold "
        f"pruning), {o['trial_epochs']} trial-epochs, best CV AUC {o['best_cv_auc']:.3f} "
        f"{o['best_config']} ({o['seconds']:.0f} s)"
    )
    gap = g["best_cv_auc"] - o["best_cv_auc"]
    print(
        f"trial-epoch ratio optuna/grid: {ratio:.3f} (goal <= 0.30); best CV AUC gap "
        f"grid - optuna {gap:+.4f} (goal <= 0.01; the standard error of one CV mean is "
        f"{g['cv_auc_se']:.4f})"
    )
    spread = statistics.stdev(g["aucs"]) if len(g["aucs"]) > 1 else math.nan
    snr = spread / g["cv_auc_se"] if g["cv_auc_se"] > 0 else math.nan
    print(
        f"the grid's CV means: SD {spread:.4f} = {snr:.1f} standard errors"
        + (
            " (the configurations differ by little more than noise: the gap measures luck)"
            if snr < 2
            else ""
        )
    )
    print(
        json.dumps(
            {
                "grid": g,
                "optuna": o,
                "epoch_ratio": ratio,
                "grid_best_cv_auc": g["best_cv_auc"],
                "optuna_best_cv_auc": o["best_cv_auc"],
                "best_gap": gap,
                "signal_to_noise": snr,
                "load_average_1m": os.getloadavg()[0],
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
