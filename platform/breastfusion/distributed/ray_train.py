"""Ray Train for one fold: the engine's ``run_fold`` on a ``TorchTrainer`` (DDP over workers).

Used by a search trial when its space asks for ``workers > 1`` (Ray 2.60's Tune-over-Train
pattern: the Tune function trainable launches the TorchTrainer). The engine itself stays
Ray-free; this module supplies its three touch points:

- ``prepare_model``: Ray's ``prepare_model`` (DDP wrapper, device placement);
- ``prepare_loader``: shards the *training* loader only. Ray's ``prepare_data_loader`` would
  also shard the validation loader (each rank would then compute its AUC on a 1/N shard,
  padded with repeated samples) and would replace the balanced ``WeightedRandomSampler`` with
  a plain ``DistributedSampler`` (losing the malignant oversampling). Here every rank draws the
  same seeded permutation/weighted draw and keeps every N-th index, and validation loaders
  pass through untouched, so every rank scores the FULL validation set (identical AUCs, hence
  identical early-stopping decisions and no DDP hang);
- ``callback``: one lagged ``ray.train.report`` per epoch (``objective.FoldReporter``),
  relayed to Tune by ``_RelayToTune``.

Every rank runs ``run_fold`` into a private temporary folder; only rank 0's outputs become the
fold's checkpoint, which the trial copies into the fold's folder of the search.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from breastfusion import runs
from breastfusion.config import Config
from breastfusion.distributed.objective import FoldReporter

FINAL_KEY = "_fold_final"  # marks the worker report the trial turns into its own fold report


class RankShardSampler(Sampler[int]):
    """Every rank draws the wrapped sampler's full order (same seed on every rank) and keeps
    indices ``rank, rank + N, …``; the order is padded by wrapping so that every rank gets
    the same number of samples (unequal batch counts would hang DDP's all-reduce)."""

    def __init__(self, inner: Sampler[int], rank: int, world: int):
        self.inner, self.rank, self.world = inner, rank, world

    @property
    def generator(self) -> torch.Generator | None:
        # The engine re-seeds ``loader.sampler.generator`` every epoch; forward it to the
        # wrapped sampler so each epoch's draw is the same on every rank.
        return getattr(self.inner, "generator", None)

    def __len__(self) -> int:
        return math.ceil(len(self.inner) / self.world)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        order = list(iter(self.inner))
        total = len(self) * self.world
        while order and len(order) < total:
            order += order[: total - len(order)]
        return iter(order[self.rank : total : self.world])


def shard_training_loader(loader: Any, rank: int, world: int) -> Any:
    """The training loader restricted to this rank's shard; evaluation loaders (sequential
    order) are returned unchanged so that validation always covers every patient."""
    if world <= 1 or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.sampler, SequentialSampler):
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=RankShardSampler(loader.sampler, rank, world),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )


def _relay_callback() -> Any:
    """Tune's ``TuneReportCallback`` minus the worker's final report: the trial reports that
    one itself, merged with the fold's summary and the fold checkpoint, so one Tune result
    stays one epoch (ASHA counts ``training_iteration``)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _RelayToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            if metrics and metrics[0].get(FINAL_KEY):
                return
            super().after_report(run_context, metrics, checkpoint)

    return _RelayToTune()


def fold_with_torchtrainer(
    cfg: Config,
    fold_dir: Path,
    *,
    workers: int,
    resources: dict[str, float],
    finished: list[float],
    storage: Path,
) -> dict[str, Any]:
    """Train fold ``cfg.data.fold`` with DDP over ``workers`` processes (GPUs when
    ``resources`` asks for them) into ``fold_dir``. Returns the last epoch's fold-tagged row.

    ``storage`` must be visible from every node (the experiment folder on shared storage):
    Ray Train uploads rank 0's checkpoint there and this process copies it back.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = resources.get("gpu", 0) > 0
    per_worker = {"CPU": resources["cpu"], **({"GPU": resources["gpu"]} if use_gpu else {})}
    name = f"fold{cfg.data.fold}-{uuid.uuid4().hex[:8]}"  # a retry must not "resume" a stale run
    storage.mkdir(parents=True, exist_ok=True)
    try:
        trainer = TorchTrainer(
            _ddp_worker,
            train_loop_config={"cfg": cfg.to_dict(), "finished": list(finished)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=str(storage),
                callbacks=[_relay_callback()],
                # A lost worker restarts the fold; Tune's max_failures covers the rest.
                failure_config=ray.train.FailureConfig(max_failures=1),
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"fold {cfg.data.fold}: the DDP run reported no checkpoint")
        with result.checkpoint.as_directory() as d:
            _copy_fold(Path(d), fold_dir)
        last = {k: v for k, v in (result.metrics or {}).items() if k.startswith("fold")}
    finally:
        shutil.rmtree(storage / name, ignore_errors=True)
    return last


def _copy_fold(src: Path, fold_dir: Path) -> None:
    """Rank 0's outputs into the fold folder, ``metrics.json`` (the finished marker) last."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == runs.FOLD_METRICS:
            continue
        if item.is_dir():
            shutil.copytree(item, fold_dir / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, fold_dir / item.name)
    if (src / runs.FOLD_METRICS).is_file():
        shutil.copy2(src / runs.FOLD_METRICS, fold_dir / runs.FOLD_METRICS)


def _ddp_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same engine, with DDP model and training-loader preparation."""
    import ray.train
    import ray.train.torch

    from breastfusion.engine.fold import run_fold

    # Ray Train workers log at INFO: every report and every epoch line of every rank would
    # reach the console; the curves are in Tune/TensorBoard already.
    for name in ("ray.train", "breastfusion"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = Config.from_dict(loop_config["cfg"])
    finished = [float(v) for v in loop_config["finished"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = Path(tempfile.mkdtemp(prefix=f"bf-rank{rank}-"))
    try:
        # Every rank calls report the same number of times (Train V2 synchronises reports):
        # the reporter's decisions depend only on the validation AUC, identical on all ranks.
        reporter = FoldReporter(cfg.data.fold, finished, ray.train.report)
        run_fold(
            cfg,
            out,
            callback=reporter,
            device=ray.train.torch.get_device(),
            prepare_model=ray.train.torch.prepare_model,
            prepare_loader=lambda loader: shard_training_loader(loader, rank, world),
            progress=lambda line: None,
        )
        final = {**(reporter.pending or {}), FINAL_KEY: 1}
        if rank == 0:
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
        else:
            ray.train.report(final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
