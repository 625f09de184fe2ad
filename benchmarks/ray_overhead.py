"""What the Ray search path costs over the plain engine (goals: throughput ratio >= 0.975,
fixed cost <= 0.5 s per fold and <= 3 s per trial start in single-worker mode).

Measured in one run, on the same synthetic cohort, config, folds and thread count:

* plain: ``run_fold`` for every fold in this process (no Ray), run before and after the Ray
         side and averaged, so a neighbour's load on a shared machine hits both sides alike;
* ray:   ``search`` with a two-point grid (2 trials run one after the other, 1 worker each,
         ``cpu`` = the plain side's torch threads: like for like), on a Ray instance started
         first (its start-up is reported apart: it is paid once per search).

Throughput = training samples / training seconds over every epoch of every fold (the engine's
own per-epoch counters in each fold's ``history.csv``), so start-up and evaluation do not
dilute it. Fixed costs come from the test hook's fold-start stamps (``BREASTFUSION_FAULT_DIR``)
and each fold's ``metrics.json`` time:

* per fold  = the time between two fold starts outside training (data set-up, validation,
              outputs, reporting, Tune's checkpoint) minus the same for the plain fold, over
              every fold (also reported for warm folds only, and for the fresh process's first
              fold, which the plain side's warm-up run makes warm on the plain side): the
              training epochs themselves are compared by the throughput, and leaving them out
              keeps a neighbour's changing load from swamping a sub-second difference (the raw
              difference of the wall times is reported too);
* per trial = the gap from a trial's last ``metrics.json`` to the next trial's first fold start
              (result, checkpoint, trial end, actor reuse, new trial's set-up);
* first trial (a fresh worker process: imports, first cache reads) = its first fold start −
              the ``search`` call, reported apart.

    python benchmarks/ray_overhead.py                       # 60 patients, 64 px, 3 folds × 2 epochs
    python benchmarks/ray_overhead.py --patients 200 --size 128 --epochs 3 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def make_cohort(root: Path, n_patients: int, size: int, folds: int) -> tuple[Path, Path]:
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import make_splits, write_splits
    from breastfusion.data.synthetic import generate_cohort
    from breastfusion.io import sha256_file

    manifest = generate_cohort(root / "cohort", n_patients=n_patients, seed=0, size=size)
    df = load_manifest(manifest)
    splits = make_splits(
        df, folds=folds, holdout=0.0, seed=0, manifest_sha256=sha256_file(manifest)
    )
    return manifest, write_splits(splits, root / "splits.json")


def fixed_values(args: argparse.Namespace) -> dict:
    return {
        "data.modality": "fusion",
        "data.size_dm": args.size,
        "data.size_us": args.size,
        "data.num_workers": 0,
        "optim.epochs": args.epochs,
        "optim.batch_size": args.batch_size,
        "optim.patience": 0,
        "model.pretrained": "none",
        "train.device": args.device,
    }


def history_rate(fold_dirs: list[Path]) -> tuple[float, float]:
    """(training samples, training seconds) from the folds' history.csv."""
    import pandas as pd

    samples = seconds = 0.0
    for d in fold_dirs:
        h = pd.read_csv(d / "history.csv")
        samples += float((h["samples_per_s"] * h["epoch_time_s"]).sum())
        seconds += float(h["epoch_time_s"].sum())
    return samples, seconds


def plain(cfg, folds: int, root: Path) -> tuple[list[float], float, float, list[float]]:
    """(wall seconds per fold, training samples, training seconds, training seconds per fold)
    of run_fold per fold."""
    from breastfusion.engine.fold import run_fold

    walls, dirs = [], []
    for k in range(folds):
        out = Path(tempfile.mkdtemp(dir=root))
        start = time.perf_counter()
        run_fold(cfg.with_overrides({"data.fold": k}), out)
        walls.append(time.perf_counter() - start)
        dirs.append(out)
    return (walls, *history_rate(dirs), [history_rate([d])[1] for d in dirs])


def through_ray(args, manifest: Path, splits: Path, root: Path, threads: int) -> dict:
    from breastfusion import runs
    from breastfusion.distributed.ray_local import init_ray
    from breastfusion.distributed.search import search
    from breastfusion.distributed.space import parse_space

    stamps = root / "stamps"
    stamps.mkdir()
    os.environ["BREASTFUSION_FAULT_DIR"] = str(stamps)  # fold-start stamps, nothing injected
    t0 = time.perf_counter()
    init_ray()
    ray_init = time.perf_counter() - t0
    space = parse_space(
        {
            "name": "overhead",
            "algorithm": "grid",
            "num_samples": 1,
            "scheduler": "none",
            "max_failures": 0,
            "max_concurrent_trials": 1,
            "resources": {"cpu": threads, "gpu": 1 if args.device == "cuda" else 0},
            "fixed": fixed_values(args),
            "space": {"optim.lr": {"grid": [1.0e-4, 1.01e-4]}},
        }
    )
    out = root / "search"
    called = time.time()
    t1 = time.perf_counter()
    summary = search(space, manifest, splits, out, echo=lambda line: None)
    wall = time.perf_counter() - t1
    folder = runs.SearchDir(out)
    trials = list(summary.trials["trial"])
    starts = {f.name: f.stat().st_mtime for f in stamps.glob("*.start")}
    fold_dirs, spans, gaps = [], [], []
    for i, name in enumerate(trials):
        begin = [
            next(v for n, v in starts.items() if n.startswith(f"{name}.fold{k}."))
            for k in range(args.folds)
        ]
        ends = [folder.trial(name).fold(k).path / "metrics.json" for k in range(args.folds)]
        fold_dirs += [e.parent for e in ends]
        trained = [history_rate([e.parent])[1] for e in ends]
        spans += [
            (k, b - a, trained[k]) for k, (a, b) in enumerate(zip(begin, begin[1:], strict=False))
        ]
        if i + 1 < len(trials):
            nxt = trials[i + 1]
            following = next(v for n, v in starts.items() if n.startswith(f"{nxt}.fold0."))
            gaps.append(following - ends[-1].stat().st_mtime)
        if i == 0:
            first_start = begin[0] - called
    samples, seconds = history_rate(fold_dirs)
    return {
        "ray_init_s": ray_init,
        "search_wall_s": wall,
        "fold_spans": spans,
        "trial_gaps": gaps,
        "first_trial_start_s": first_start,
        "samples": samples,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    import torch

    from breastfusion.config import Config

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bf-overhead-") as tmp:
        root = Path(tmp)
        manifest, splits = make_cohort(root, args.patients, args.size, args.folds)
        cfg = Config().with_overrides(
            {
                **fixed_values(args),
                "optim.lr": 1.0e-4,
                "data.manifest": str(manifest.resolve()),
                "data.splits": str(splits.resolve()),
            }
        )
        # Warm-up: builds the preprocessing cache and warms torch's kernels.
        plain(cfg.with_overrides({"optim.epochs": 1}), 1, root)
        p1 = plain(cfg, args.folds, root)
        ray = through_ray(args, manifest, splits, root, threads)
        p2 = plain(cfg, args.folds, root)

    p_folds = [(a + b) / 2 for a, b in zip(p1[0], p2[0], strict=True)]
    p_train = [(a + b) / 2 for a, b in zip(p1[3], p2[3], strict=True)]
    p_rate = (p1[1] + p2[1]) / (p1[2] + p2[2])
    r_rate = ray["samples"] / ray["seconds"]
    raw = [span - p_folds[k] for k, span, _ in ray["fold_spans"]]
    per_fold = [(span - t) - (p_folds[k] - p_train[k]) for k, span, t in ray["fold_spans"]]
    # A trial process imports what a fold needs and reads the cohort when it starts
    # (``worker.warm_process``), so its first fold costs what the plain side's folds cost
    # after their warm-up run; that start-up is part of the first trial's start, reported apart.
    warm = per_fold[1:]
    warm_cost = sum(warm) / len(warm) if warm else float("nan")
    fold_cost = sum(per_fold) / len(per_fold) if per_fold else float("nan")
    trial_cost = sum(ray["trial_gaps"]) / len(ray["trial_gaps"])
    result = {
        "folds": args.folds,
        "epochs": args.epochs,
        "threads": threads,
        "plain_samples_per_s": p_rate,
        "ray_samples_per_s": r_rate,
        "throughput_ratio": r_rate / p_rate,
        "plain_seconds_per_fold": p_folds,
        "fixed_cost_per_fold_s": fold_cost,
        "fixed_cost_per_fold_warm_s": warm_cost,
        "fixed_cost_first_fold_fresh_process_s": per_fold[0] if per_fold else float("nan"),
        "fixed_cost_per_fold_each_s": per_fold,
        "wall_difference_per_fold_each_s": raw,
        "plain_samples_per_s_before": p1[1] / p1[2],
        "plain_samples_per_s_after": p2[1] / p2[2],
        "fixed_cost_per_trial_start_s": trial_cost,
        "first_trial_start_s": ray["first_trial_start_s"],
        "ray_init_s": ray["ray_init_s"],
        "search_wall_s": ray["search_wall_s"],
        "load_average_1m": os.getloadavg()[0],
    }
    print(
        f"throughput: plain {p_rate:.1f} samples/s, ray {r_rate:.1f} samples/s, "
        f"ratio {r_rate / p_rate:.3f} (goal >= 0.975; {threads} thread(s) on both sides; "
        f"plain before/after {p1[1] / p1[2]:.1f}/{p2[1] / p2[2]:.1f}: the load's drift)"
    )
    print(
        f"fixed cost: {fold_cost:+.2f} s per fold (goal <= 0.5; {warm_cost:+.2f} after a "
        f"process's first fold, which cost {per_fold[0]:+.2f} s), "
        f"{trial_cost:.2f} s per trial start in a reused process (goal <= 3); first trial "
        f"{ray['first_trial_start_s']:.1f} s after the call (a fresh process: Ray's worker, "
        f"imports, the cohort), ray.init "
        f"{ray['ray_init_s']:.1f} s once per search"
    )
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
