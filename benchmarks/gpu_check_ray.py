"""Sections (b) and (c) of ``gpu_check.py``: fractional-GPU Ray Tune trials and a Ray Train
NCCL run. A module of its own (not ``__main__``) so that Ray workers import these functions
by name; ``start_ray`` puts this folder and ``platform/`` on the workers' ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from gpu_check import PLATFORM, amp_setup, build_fusion, random_batch, sync, train_steps

HERE = str(Path(__file__).resolve().parent)


def start_ray() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        configure_logging=False,
        # Workers import breastfusion (this checkout, installed or not) and this module.
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([PLATFORM, HERE])}},
    )


def _tune_trial(config: dict) -> None:
    """One fractional-GPU trial: train for ``seconds`` and report when it ran."""
    import torch
    from ray import tune

    device = torch.device("cuda" if config["gpu"] else "cpu")
    torch.manual_seed(config["trial"])
    model = build_fusion().to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype, scaler = amp_setup(device)
    data = random_batch(config["batch"], config["size"], device, channels_last=True)
    train_steps(model, opt, data, 2, device, dtype, scaler)  # warm-up
    sync(device)
    waited = barrier(Path(config["barrier"]), config["trial"], config["trials"])
    start, steps = time.time(), 0
    while time.time() - start < config["seconds"]:
        train_steps(model, opt, data, 1, device, dtype, scaler)
        steps += 1
    sync(device)
    end = time.time()
    tune.report(
        {
            "start": start,
            "end": end,
            "steps": steps,
            "pairs_per_s": steps * config["batch"] / (end - start),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "barrier_wait_s": waited,
        }
    )


def barrier(folder: Path, me: int, n: int, timeout: float = 90.0) -> float:
    """Wait until ``n`` trials are ready (files in ``folder``) or ``timeout`` passes, so the
    timed windows overlap exactly when Ray really runs the trials at once (process start-up
    skew would otherwise blur it). Returns the seconds waited."""
    t0 = time.time()
    (folder / f"ready-{me}").touch()
    while len(list(folder.glob("ready-*"))) < n and time.time() - t0 < timeout:
        time.sleep(0.05)
    return time.time() - t0


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def fractional_trials(args, gpu: bool, storage: str) -> dict:
    """(b) 4 trials × 0.25 GPU through Ray Tune, all at once on one GPU."""
    from ray import tune

    fraction = 1.0 / args.trials
    # Dry run: CPU fractions so that every trial fits at once on a small machine too.
    resources = {"cpu": 1, "gpu": fraction} if gpu else {"cpu": fraction}
    space = {
        "trial": tune.grid_search(list(range(args.trials))),
        "gpu": gpu,
        "size": args.trial_size,
        "batch": args.trial_batch,
        "seconds": args.trial_seconds,
        "trials": args.trials,
        "barrier": tempfile.mkdtemp(prefix="barrier-", dir=storage),
    }
    t0 = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(_tune_trial, resources),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=args.trials),
        run_config=tune.RunConfig(storage_path=storage, name="fractional", verbose=0),
    )
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    rows = [r.metrics for r in grid]
    errors = [str(r.error) for r in grid if r.error]
    spans = [(m["start"], m["end"]) for m in rows if "start" in m]
    return {
        "trials": args.trials,
        "gpu_per_trial": fraction if gpu else 0.0,
        "wall_s": wall,
        "max_concurrent": max_overlap(spans),
        "all_concurrent": max_overlap(spans) == args.trials,
        "pairs_per_s_per_trial": [m.get("pairs_per_s") for m in rows],
        "barrier_wait_s": [m.get("barrier_wait_s") for m in rows],
        "pairs_per_s_total": sum(m.get("pairs_per_s", 0.0) for m in rows),
        "cuda_visible_devices": sorted({m.get("cuda_visible_devices", "") for m in rows}),
        "errors": errors,
    }


def _ddp_loop(config: dict) -> None:
    """Ray Train worker: DDP steps, then an all-reduce whose sum proves the group works."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_fusion())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype, scaler = amp_setup(device)
    data = random_batch(config["batch"], config["size"], device, channels_last=False)
    train_steps(model, opt, data, 2, device, dtype, scaler)
    sync(device)
    t0 = time.perf_counter()
    train_steps(model, opt, data, config["steps"], device, dtype, scaler)
    sync(device)
    seconds = time.perf_counter() - t0
    rank, world = dist.get_rank(), dist.get_world_size()
    probe = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(probe)
    metrics = {
        "backend": dist.get_backend(),
        "world_size": world,
        "steps_per_s": config["steps"] / seconds,
        "allreduce_ok": float(probe) == world * (world + 1) / 2,
    }
    if rank == 0:  # Ray Train v2 keeps metrics only with a checkpoint: hand them over by file
        Path(config["out"]).write_text(json.dumps(metrics))
    ray.train.report(metrics)


def ray_train_ddp(args, gpu: bool, storage: str) -> dict:
    """(c) TorchTrainer, NCCL backend, one worker per GPU present."""
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = torch.cuda.device_count() if gpu else 1
    out = Path(storage) / "ddp_metrics.json"
    trainer = TorchTrainer(
        _ddp_loop,
        train_loop_config={
            "size": args.trial_size,
            "batch": args.trial_batch,
            "steps": 10,
            "out": str(out),
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(storage_path=storage, name="ddp"),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    metrics = result.metrics or (json.loads(out.read_text()) if out.is_file() else {})
    return {"workers": workers, "wall_s": time.perf_counter() - t0, **metrics}
