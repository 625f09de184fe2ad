"""Does the cost of an epoch grow with patients, not pairs? (goals: per-patient cost ratio
800/200 <= 1.25, peak RSS <= 4 GB)

For synthetic cohorts of 200, 400 and 800 patients, one child process per cohort (fresh memory,
so its peak RSS is its own) times:

* data:  manifest validation → ``PairedDataset`` on a cold preprocessing cache (decode,
  min-max, pad, resize, uint8, cache write, preload) with ``pairs_per_patient``;
* train: one epoch of late-fusion training (dual ResNet-18 from scratch, plain Adam step,
  flips, balanced sampler) through ``make_loader`` at batch 16 on 2 threads, after one
  untimed warm-up step (one-off kernel selection/allocation is not per-patient cost).

Seconds per patient = (data + train) / patients; the headline is its ratio 800 / 200. Built
from public pieces only (datasets, ``make_loader``, ``models.fusion.build_model``), so it does
not depend on the engine. Cohort generation is not timed (it stands in for a data set on
disk). The last line printed is JSON with every figure.

    python benchmarks/scaling.py                       # 200/400/800 patients, 48 px, 2 threads
    python benchmarks/scaling.py --repeat 2 --size 64  # two runs per size (median reported)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

GOAL_RATIO = 1.25
GOAL_RSS_GB = 4.0


def peak_rss_gb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * 1024 / 1e9


def build_data(manifest: Path, cache_dir: Path, args: argparse.Namespace):
    from breastfusion.data.augment import AugmentSpec
    from breastfusion.data.cache import PreprocessSpec
    from breastfusion.data.datasets import PairedDataset
    from breastfusion.data.manifest import load_manifest

    df = load_manifest(manifest)
    ids = sorted(df["patient_id"].unique())
    spec = PreprocessSpec(args.size, "pad")
    return PairedDataset(
        df,
        ids,
        spec,
        spec,
        cache_dir,
        augment=AugmentSpec(hflip=0.5, vflip=0.5),
        seed=0,
        workers=args.threads,
        pairs_per_patient=args.pairs_per_patient,
    )


def warm_model(args: argparse.Namespace):
    """The model and optimiser after one untimed step: the first step pays one-off costs
    (allocator, oneDNN kernel selection, Adam state) that are not per-patient work."""
    import torch

    from breastfusion.models.fusion import build_model

    torch.manual_seed(0)
    model = build_model("fusion", "resnet18", "resnet18", fusion="sum")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch_size, 1, args.size, args.size)
    y = torch.arange(args.batch_size) % 2
    train_step(model, opt, x, x, y)
    return model, opt


def train_step(model, opt, dm, us, y) -> None:
    import torch

    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(dm, us), y).backward()
    opt.step()


def train_one_epoch(ds, model, opt, args: argparse.Namespace) -> int:
    from breastfusion.data.datasets import make_loader, set_loader_epoch

    loader = make_loader(
        ds, batch_size=args.batch_size, train=True, oversample="sampler", seed=0, num_workers=0
    )
    set_loader_epoch(loader, 1)
    n = 0
    for batch in loader:
        train_step(model, opt, batch["dm"], batch["us"], batch["y"])
        n += len(batch["y"])
    return n


def run_one(args: argparse.Namespace) -> dict:
    """One cohort in this process: time data then one training epoch."""
    # Imports are one-off costs, not per-patient work (albumentations alone takes ~2 s).
    import albumentations  # noqa: F401
    import torch

    import breastfusion.data.datasets  # noqa: F401
    import breastfusion.data.manifest  # noqa: F401

    torch.set_num_threads(args.threads)
    try:
        import cv2

        cv2.setNumThreads(args.threads)
    except ImportError:  # pragma: no cover
        pass
    t_warm = time.perf_counter()
    model, opt = warm_model(args)
    warm_s = time.perf_counter() - t_warm
    manifest = Path(args.manifest)
    with tempfile.TemporaryDirectory(prefix="bf-scaling-cache-") as cache_dir:
        c0, t0 = time.process_time(), time.perf_counter()
        ds = build_data(manifest, Path(cache_dir), args)
        t1 = time.perf_counter()
        trained = train_one_epoch(ds, model, opt, args)
        c2, t2 = time.process_time(), time.perf_counter()
    patients = len(ds.patients) + ds.n_excluded
    return {
        "patients": patients,
        "paired_patients": len(ds.patients),
        "pairs_total": len(ds.all_pairs),
        "samples_per_epoch": len(ds),
        "samples_trained": trained,
        "warmup_s_untimed": warm_s,
        "data_s": t1 - t0,
        "train_s": t2 - t1,
        "total_s": t2 - t0,
        "s_per_patient": (t2 - t0) / patients,
        # CPU seconds of all this process's threads: steadier than wall time on a shared
        # machine (a busy neighbour stretches wall time, not the work done).
        "cpu_s_per_patient": (c2 - c0) / patients,
        "train_s_per_patient": (t2 - t1) / patients,
        "train_s_per_sample": (t2 - t1) / max(trained, 1),
        "peak_rss_gb": peak_rss_gb(),
    }


def cohort(workdir: Path, n: int, image_size: int) -> Path:
    from breastfusion.data.synthetic import generate_cohort

    manifest = workdir / f"cohort_{n}" / "manifest.csv"
    if not manifest.is_file():
        t0 = time.perf_counter()
        manifest = generate_cohort(manifest.parent, n_patients=n, seed=0, size=image_size)
        print(f"generated {n} patients in {time.perf_counter() - t0:.1f} s (not timed)")
    return manifest


def child(manifest: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        str(manifest),
        "--size",
        str(args.size),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--pairs-per-patient",
        str(args.pairs_per_patient),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(results: dict[int, list[dict]], args: argparse.Namespace) -> dict:
    sizes = sorted(results)
    med = {n: statistics.median(r["s_per_patient"] for r in results[n]) for n in sizes}
    ratio = med[sizes[-1]] / med[sizes[0]]
    cpu = {n: statistics.median(r.get("cpu_s_per_patient", 0.0) for r in results[n]) for n in sizes}
    spread = {
        n: (
            max(r["s_per_patient"] for r in results[n])
            / min(r["s_per_patient"] for r in results[n])
        )
        for n in sizes
    }
    peak = max(r["peak_rss_gb"] for rs in results.values() for r in rs)
    return {
        "per_patient_cost_ratio": ratio,
        "per_patient_cost_ratio_goal": GOAL_RATIO,
        "per_patient_cpu_cost_ratio": cpu[sizes[-1]] / cpu[sizes[0]] if cpu[sizes[0]] else None,
        "peak_rss_gb": peak,
        "peak_rss_gb_goal": GOAL_RSS_GB,
        "s_per_patient_median": {str(n): med[n] for n in sizes},
        "repeat_spread_max_over_min": {str(n): spread[n] for n in sizes},
        "runs": {str(n): results[n] for n in sizes},
        "settings": {
            "size": args.size,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "pairs_per_patient": args.pairs_per_patient,
            "repeat": args.repeat,
            "load_average_1min": os.getloadavg()[0],
            "cpus": os.cpu_count(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--patients", default="200,400,800", help="comma-separated cohort sizes")
    p.add_argument("--size", type=int, default=48, help="model input size (px)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs-per-patient", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs per cohort size (median)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the cohorts here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: a manifest
    args = p.parse_args(argv)
    if args.one is not None:
        args.manifest = args.one
        print(json.dumps(run_one(args)))
        return 0

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bf-scaling-")
        args.workdir = Path(tmp.name)
    sizes = [int(x) for x in args.patients.split(",")]
    manifests = {n: cohort(args.workdir, n, image_size=2 * args.size) for n in sizes}
    results: dict[int, list[dict]] = {n: [] for n in sizes}
    for rep in range(args.repeat):
        for n in sizes:
            r = child(manifests[n], args)
            results[n].append(r)
            print(
                f"run {rep + 1}: {n:4d} patients ({r['paired_patients']} paired, "
                f"{r['pairs_total']} pairs, {r['samples_per_epoch']} per epoch): data "
                f"{r['data_s']:.1f} s + train {r['train_s']:.1f} s = "
                f"{1000 * r['s_per_patient']:.1f} ms/patient "
                f"({1000 * r['cpu_s_per_patient']:.1f} CPU), peak RSS {r['peak_rss_gb']:.2f} GB"
            )
    summary = summarise(results, args)
    print(
        f"per-patient cost {sizes[-1]}/{sizes[0]}: {summary['per_patient_cost_ratio']:.3f} "
        f"(goal <= {GOAL_RATIO}; CPU time {summary['per_patient_cpu_cost_ratio']:.3f}); "
        f"peak RSS {summary['peak_rss_gb']:.2f} GB (goal <= {GOAL_RSS_GB})"
    )
    print(json.dumps(summary, sort_keys=True))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
