"""How much of the model's speed the full training loop keeps (goal: ratio >= 0.95).

Measured in one run, on the same model, optimiser and batch size, with the engine's own
``train_step``:

* loop:    cache → dataset → augmentation → DataLoader → ``train_step`` (``build_fold_data``)
* compute: ``train_step`` on batches already collated in memory (no dataset, no loader)

The two are interleaved step by step (a compute step, then a loop step: fetch the next batch
and train on it), so a neighbour's burst of CPU use hits both sides alike; the per-step
medians give the headline numbers, the totals are printed too. The preprocessing cache is
built before timing: it is an offline stage (built once per size and reused).

    python benchmarks/loop_vs_compute.py              # dual ResNet-18, 64 px, batch 8, CPU
    python benchmarks/loop_vs_compute.py --size 128 --modality us --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def make_cohort(root: Path, n_patients: int, image_size: int) -> tuple[Path, Path]:
    """A synthetic cohort and its splits in ``root`` (the demo's generator); reused if there."""
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import make_splits, write_splits
    from breastfusion.data.synthetic import generate_cohort
    from breastfusion.io import sha256_file

    manifest = root / "cohort" / "manifest.csv"
    splits = root / "splits.json"
    if not (manifest.is_file() and splits.is_file()):
        manifest = generate_cohort(root / "cohort", n_patients=n_patients, seed=0, size=image_size)
        df = load_manifest(manifest)
        sha = sha256_file(manifest)
        write_splits(make_splits(df, folds=2, holdout=0.0, seed=0, manifest_sha256=sha), splits)
    return manifest, splits


def engine_entry_points():
    """``build_fold_data`` and ``build_model_from_config``: from ``engine.fold`` (their new
    home), else from ``engine.train_cli`` (before the move), so the benchmark runs on both."""
    try:
        from breastfusion.engine.fold import build_fold_data, build_model_from_config
    except ImportError:
        from breastfusion.engine.train_cli import build_fold_data, build_model_from_config
    return build_fold_data, build_model_from_config


def endless(loader):
    """Batches from ``loader`` forever (a new epoch whenever one ends, told to the dataset as
    the engine does, so pair sampling draws new pairs)."""
    from breastfusion.data.datasets import set_loader_epoch

    epoch = 0
    while True:
        epoch += 1
        set_loader_epoch(loader, epoch)
        yield from loader


def measure(cfg, loader, model, steps: int) -> dict[str, list[float]]:
    """Interleaved per-step timings: compute step, loop fetch, loop step."""
    import torch

    from breastfusion.engine.loop import (
        AmpPolicy,
        build_optimizer,
        resolve_device,
        seed_everything,
        train_step,
    )

    seed_everything(cfg.optim.seed)
    device = resolve_device(cfg.train.device)
    channels_last = cfg.train.channels_last and device.type == "cuda"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(cfg.optim, model.parameters())
    amp = AmpPolicy(device, cfg.train.amp)
    batches = endless(loader)
    memory = [next(batches) for _ in range(4)]  # the compute side cycles over these

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(batch) -> None:
        train_step(model, batch, optimizer, amp, device, channels_last)
        sync()

    for i in range(3):  # warm-up: allocator, kernel selection, worker start
        step(memory[i % 4])
        step(next(batches))
    out: dict[str, list[float]] = {"compute": [], "fetch": [], "loop_step": []}
    for i in range(steps):
        t0 = time.perf_counter()
        step(memory[i % 4])
        t1 = time.perf_counter()
        batch = next(batches)
        t2 = time.perf_counter()
        step(batch)
        t3 = time.perf_counter()
        out["compute"].append(t1 - t0)
        out["fetch"].append(t2 - t1)
        out["loop_step"].append(t3 - t2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--modality", default="fusion", choices=["dm", "us", "fusion"])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=64, help="model input size (px)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patients", type=int, default=40, help="synthetic patients")
    p.add_argument("--steps", type=int, default=40, help="timed steps per side")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers (default: auto)")
    p.add_argument("--elastic", type=float, default=None, help="elastic probability override")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--workdir", type=Path, default=None, help="keep the cohort/cache here")
    p.add_argument(
        "--pairs-per-patient", type=int, default=None, help="data.pairs_per_patient (fusion)"
    )
    args = p.parse_args(argv)

    import torch

    from breastfusion.config import Config

    build_fold_data, build_model_from_config = engine_entry_points()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bf-bench-")
        args.workdir = Path(tmp.name)
    manifest, splits = make_cohort(args.workdir, args.patients, image_size=2 * args.size)
    overrides = {
        "data.manifest": str(manifest),
        "data.splits": str(splits),
        "data.cache_dir": str(args.workdir / "cache"),
        "data.modality": args.modality,
        "data.size_dm": args.size,
        "data.size_us": args.size,
        "data.num_workers": args.num_workers,
        "model.backbone_dm": args.backbone,
        "model.backbone_us": args.backbone,
        "optim.batch_size": args.batch_size,
        "train.device": args.device,
    }
    if args.elastic is not None:
        overrides["augment.elastic"] = args.elastic
    if args.pairs_per_patient is not None:
        overrides["data.pairs_per_patient"] = args.pairs_per_patient
    cfg = Config().with_overrides(overrides)

    t0 = time.perf_counter()
    data = build_fold_data(cfg)  # builds the cache (offline stage, not timed below)
    print(f"cache + datasets: {time.perf_counter() - t0:.1f} s, {data.summary}")
    loader = data.train_loader
    t = measure(cfg, loader, build_model_from_config(cfg), args.steps)

    bs = args.batch_size
    med = {k: statistics.median(v) for k, v in t.items()}
    compute_med = bs / med["compute"]
    loop_med = bs / (med["fetch"] + med["loop_step"])
    compute_tot = bs * args.steps / sum(t["compute"])
    loop_tot = bs * args.steps / (sum(t["fetch"]) + sum(t["loop_step"]))
    print(
        f"{args.modality} {args.backbone} {args.size}px batch {bs}, {args.steps} interleaved "
        f"steps per side, device {args.device}, torch threads {torch.get_num_threads()}, "
        f"loader workers {loader.num_workers}, pin_memory {loader.pin_memory}, augment "
        f"hflip/vflip/elastic {cfg.augment.hflip}/{cfg.augment.vflip}/{cfg.augment.elastic}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"model-only step : {compute_med:7.1f} samples/s (median step)  {compute_tot:7.1f} (total)"
    )
    print(f"full loop       : {loop_med:7.1f} samples/s (median step)  {loop_tot:7.1f} (total)")
    print(
        f"  of which batch fetch (dataset → augment → loader): median "
        f"{1000 * med['fetch'] / bs:.2f} ms/sample, step {1000 * med['loop_step'] / bs:.2f} ms/sample"
    )
    print(
        f"ratio loop/model: {loop_med / compute_med:.3f} (median steps)  "
        f"{loop_tot / compute_tot:.3f} (totals)   goal >= 0.95"
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
