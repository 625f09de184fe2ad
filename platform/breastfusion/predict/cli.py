"""``breastfusion predict BUNDLE --manifest M --out D``: flags → ``predict.run.predict``."""

from __future__ import annotations

from pathlib import Path

import click

from breastfusion.errors import UserError
from breastfusion.final.scoring import BACKENDS


@click.command("predict")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--manifest",
    "source",
    type=click.Path(path_type=Path),
    help="Manifest CSV (labels optional) or a folder of <patient>_<DM|US>[_...].<ext> images.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--evaluate", is_flag=True, help="Metrics with CIs (needs every patient's label).")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True)
@click.option("--gradcam", type=int, default=0, show_default=True, help="Grad-CAM patients "
              "per category (0: none).")  # fmt: skip
@click.option("--device", default=None, help="auto | cpu | cuda[:N] (torch backend) [cpu].")
@click.option("--bootstrap", type=int, default=2000, show_default=True, help="With --evaluate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
def predict_command(
    bundle: Path,
    source: Path | None,
    out: Path,
    evaluate: bool,
    backend: str,
    gradcam: int,
    device: str | None,
    bootstrap: int,
    seed: int,
) -> None:
    """Score patients with BUNDLE (a `breastfusion final` output folder or its bundle/):
    the bundle's own lesion detector, preprocessing, model, calibration and threshold.
    Writes OUT/predictions.csv (one row per patient) and OUT/images.csv."""
    from breastfusion.predict.run import predict

    if source is None:
        raise UserError("give the patients to score: --manifest MANIFEST.csv (or an image folder)")
    if gradcam < 0:
        raise UserError(f"--gradcam must be >= 0, got {gradcam}")
    if evaluate and bootstrap < 100:
        raise UserError(f"--bootstrap must be at least 100, got {bootstrap}")
    result = predict(
        bundle, source, out, evaluate=evaluate, backend=backend, gradcam=gradcam,
        device=device, n_boot=bootstrap, seed=seed, progress=click.echo,
    )  # fmt: skip
    if result.metrics is not None:
        for w in result.metrics.get("warnings") or []:
            click.echo(f"warning: {w}", err=True)
        for name, m in result.metrics["models"].items():
            auc = m["auc"]
            click.echo(
                f"{name}: AUC {auc['value']:.3f} ({auc['ci_low']:.3f}–{auc['ci_high']:.3f}), "
                f"sensitivity {m['sensitivity']['value']:.3f}, specificity "
                f"{m['specificity']['value']:.3f} ({m['n_patients']} patients)"
            )
    click.echo(f"wrote {out / 'predictions.csv'} and images.csv")
