"""``breastfusion final``: flags → ``final.*`` settings → ``final.run.final_model``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from breastfusion.errors import ConfigError
from breastfusion.final.settings import MODES, FinalSettings

# settings key -> flag, so that a settings error names what the user typed
FLAGS = {
    "mode": "--mode",
    "target_sensitivity": "--target-sensitivity",
    "epochs": "--epochs",
    "gradcam_per_category": "--gradcam",
    "bootstrap": "--bootstrap",
    "seed": "--seed",
    "device": "--device",
    "keep_patient_ids": "--keep-patient-ids",
    "onnx": "--no-onnx",
}


def settings_from_flags(values: dict[str, Any]) -> FinalSettings:
    try:
        return FinalSettings.from_dict({k: v for k, v in values.items() if v is not None})
    except ConfigError as exc:
        message = str(exc)
        for key, flag in FLAGS.items():
            message = message.replace(f"final.{key} ", f"final.{key} ({flag}) ", 1)
        raise ConfigError(message) from None


def _dir(**kw: Any) -> click.Path:
    return click.Path(file_okay=False, path_type=Path, **kw)


@click.command("final")
@click.option("--search", "search_dir", type=_dir(), help="Search folder (its best.json, trials/).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The chosen configuration: a JSON record (aggregate/search best) or a config YAML.",
)
@click.option("--out", required=True, type=_dir(), help="Output folder (bundle/ and the holdout).")
@click.option("--mode", type=click.Choice(MODES), default=None, help="[refit]")
@click.option("--target-sensitivity", type=float, default=None, help="Operating point, chosen "
              "on the pooled calibrated out-of-fold scores.")  # fmt: skip
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), help="[config's]")
@click.option("--splits", type=click.Path(dir_okay=False, path_type=Path), help="[config's]")
@click.option("--detector", "detector_dir", type=_dir(), help="Detector bundle (roi) to ship.")
@click.option("--fallback-dm", type=_dir(), help="DM-only bundle for patients without US.")
@click.option("--fallback-us", type=_dir(), help="US-only bundle for patients without DM.")
@click.option("--epochs", type=int, default=None, help="Refit epochs [from the folds].")
@click.option("--gradcam", type=int, default=None, help="Grad-CAM patients per category [3].")
@click.option("--bootstrap", type=int, default=None, help="AUC bootstrap resamples [2000].")
@click.option("--seed", type=int, default=None, help="Bootstrap seed [0].")
@click.option("--device", default=None, help="auto | cpu | cuda[:N] [the config's].")
@click.option("--keep-patient-ids", is_flag=True, default=None, help="Put ids in the bundle.")
@click.option("--no-onnx", is_flag=True, default=False, help="Skip model.onnx.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder not made by final.")
def final_command(
    search_dir: Path | None,
    config_file: Path | None,
    out: Path,
    manifest: Path | None,
    splits: Path | None,
    detector_dir: Path | None,
    fallback_dm: Path | None,
    fallback_us: Path | None,
    overwrite: bool,
    no_onnx: bool,
    **flags: Any,
) -> None:
    """Refit (or ensemble) the chosen configuration, evaluate it once on the holdout, export
    a self-contained bundle (OUT/bundle) for `breastfusion predict`."""
    from breastfusion.final.choice import choice_from_files
    from breastfusion.final.run import final_model

    flags["gradcam_per_category"] = flags.pop("gradcam")
    flags["onnx"] = False if no_onnx else None
    settings = settings_from_flags(flags)
    fallbacks = {k: v for k, v in (("dm", fallback_dm), ("us", fallback_us)) if v is not None}
    result = final_model(
        choice_from_files(search_dir, config_file),
        out,
        manifest=manifest,
        splits=splits,
        settings=settings,
        detector_dir=detector_dir,
        fallbacks=fallbacks,
        overwrite=overwrite,
        progress=click.echo,
    )
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(result.headline)
    click.echo(f"bundle: {result.bundle}  (breastfusion predict {result.bundle} --manifest ...)")
