"""``breastfusion train``: flags → a validated ``Config`` → ``engine.fold.run_fold``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from breastfusion.config import PRETRAINED_KEYWORDS, Config, load_yaml
from breastfusion.engine.fold import fmt_metric, run_fold
from breastfusion.errors import ConfigError
from breastfusion.fsguard import FolderLock, claim


def overrides_from_flags(**flags: Any) -> dict[str, Any]:
    """Map the given (non-None) CLI flags to dotted config keys; paths become absolute."""
    pairs = {
        "manifest": "data.manifest",
        "splits": "data.splits",
        "fold": "data.fold",
        "modality": "data.modality",
        "size_dm": "data.size_dm",
        "size_us": "data.size_us",
        "cache_dir": "data.cache_dir",
        "num_workers": "data.num_workers",
        "max_patients": "data.max_patients",
        "backbone_dm": "model.backbone_dm",
        "backbone_us": "model.backbone_us",
        "fusion": "model.fusion",
        "pretrained": "model.pretrained",
        "epochs": "optim.epochs",
        "batch_size": "optim.batch_size",
        "lr": "optim.lr",
        "patience": "optim.patience",
        "seed": "optim.seed",
        "device": "train.device",
    }
    out: dict[str, Any] = {}
    # General flags first so that the specific ones (--backbone-dm, --size-us) win.
    if flags.get("backbone") is not None:
        out["model.backbone_dm"] = out["model.backbone_us"] = flags["backbone"]
    if flags.get("size") is not None:
        out["data.size_dm"] = out["data.size_us"] = flags["size"]
    for flag, key in pairs.items():
        value = flags.get(flag)
        if value is None:
            continue
        if flag in ("manifest", "splits", "cache_dir") or (
            flag == "pretrained" and value not in PRETRAINED_KEYWORDS
        ):
            value = str(Path(value).expanduser().resolve())
        out[key] = value
    return out


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. optim.lr=3e-4), got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def resolve_config(config_file: str | None, sets: Sequence[str], **flags: Any) -> Config:
    """Defaults ← ``--config`` file ← ``--set`` overrides ← explicit flags."""
    cfg = load_yaml(config_file) if config_file else Config()
    overrides = {**_parse_set(sets), **overrides_from_flags(**flags)}
    return cfg.with_overrides(overrides) if overrides else cfg


@click.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML config; flags override it.",
)
@click.option("--manifest", type=click.Path(dir_okay=False), help="Manifest CSV.")
@click.option("--splits", type=click.Path(dir_okay=False), help="Splits JSON (breastfusion split).")
@click.option("--fold", type=int, help="Fold to train (validation = that fold). [0]")
@click.option("--modality", type=click.Choice(["dm", "us", "fusion"]), help="[fusion]")
@click.option("--backbone", help="Backbone for every branch (e.g. resnet18).")
@click.option("--backbone-dm", help="Backbone of the DM branch (overrides --backbone).")
@click.option("--backbone-us", help="Backbone of the US branch (overrides --backbone).")
@click.option("--fusion", help="Fusion head for --modality fusion (sum, concat, ...). [sum]")
@click.option("--size", type=int, help="Input size (px) for both modalities.")
@click.option("--size-dm", type=int, help="DM input size in px. [224]")
@click.option("--size-us", type=int, help="US input size in px. [224]")
@click.option("--epochs", type=int, help="[200]")
@click.option("--batch-size", type=int, help="[8]")
@click.option("--lr", type=float, help="Learning rate (Adam). [1e-4]")
@click.option(
    "--patience",
    type=int,
    help="Early stopping on an inner split of the training fold (never the validation fold); 0 = train every epoch and report the last. [20]",
)
@click.option("--seed", type=int, help="[0]")
@click.option("--pretrained", help="none | imagenet | PATH to a state dict. [none]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[auto]")
@click.option("--num-workers", type=int, help="Loader worker processes (default: auto).")
@click.option("--max-patients", type=int, help="Debug: at most N patients per split.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Preprocessing cache [next to the manifest].",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any config key, e.g. --set augment.elastic=0.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Write into a non-empty --out that `train` did not make (its files may be replaced).",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder."
)
def train_command(
    config_file: str | None,
    sets: tuple[str, ...],
    resume: bool,
    overwrite: bool,
    out_dir: str,
    **flags: Any,
) -> None:
    """Train one fold; write config.yaml, predictions.csv, history.csv, tensorboard/, model.pt
    and metrics.json to --out (curves: tensorboard --logdir OUT)."""
    cfg = resolve_config(config_file, sets, **flags)
    for key, flag in (("manifest", "--manifest"), ("splits", "--splits")):
        if not getattr(cfg.data, key):
            raise ConfigError(f"no {key} given ({flag} or data.{key} in the config)")
    click.echo(f"config {cfg.config_hash()[:12]} → {out_dir}")
    with FolderLock(out_dir, "train"):
        claim(out_dir, "train", overwrite=overwrite)
        result = run_fold(cfg, out_dir, resume=resume, progress=click.echo)
    m = result.metrics
    click.echo(
        "validation (patients): "
        + "  ".join(
            f"{k} {fmt_metric(m[k])}"
            for k in ("auc", "sensitivity", "specificity", "precision", "accuracy")
        )
        + f"  at threshold {m['threshold_probability']:g} (probability)"
    )
