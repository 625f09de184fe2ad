"""The main job: one study from manifest (or synthetic cohort) to HTML report, as stages.

``breastfusion run STUDY.yaml`` runs, in order::

    01_data       validate the manifest, or generate the synthetic cohort
    02_splits     holdout + patient-level stratified K folds (splits.json)
    03_roi        US lesion detector (YOLOv8) trained and applied → cropped manifest
                  (or manifest boxes, or no cropping: ``roi.mode``)
    04_backbones_dm, 05_backbones_us   the study's backbone comparison per modality (searches)
    06_fusion     Optuna search for the fusion model over the folds
    07_aggregate  tables like the study's Tables 1–3, and the chosen final configuration
    08_final      refit, holdout evaluation (CIs, DeLong, operating point), export, Grad-CAM
    09_report     report/index.html

Each stage writes under ``STUDY_DIR/<stage>/`` and, last, a ``stage.json`` holding the hash of
its inputs (its own settings plus the hashes of the stages it reads). A stage whose
``stage.json`` matches is skipped; a changed setting re-runs that stage and every stage
downstream of it (their input hashes change). A stage that fails leaves no ``stage.json``,
so its partial outputs never count as done. Searches are the one partial output worth
keeping: with ``--resume`` an interrupted search stage continues (Ray Tune restore) instead
of starting again.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breastfusion.errors import ConfigError, UserError
from breastfusion.io import atomic_write_json, sha256_file, sha256_json

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
ROI_MODES = ("detect", "boxes", "none")

_STUDY_KEYS = {
    "name": str,
    "description": str,
    "out": str,
    "data": dict,
    "splits": dict,
    "roi": dict,
    "base": dict,
    "backbones": dict,
    "fusion": (str, dict),
    "final": dict,
    "report": dict,
}


@dataclass(frozen=True)
class StudyConfig:
    """A study YAML, validated; see jobs/demo.yaml for a commented example."""

    name: str
    path: Path
    out: Path | None
    data: dict[str, Any]
    splits: dict[str, Any]
    roi: dict[str, Any]
    base: dict[str, Any]
    backbones: dict[str, Any]
    fusion: Any
    final: dict[str, Any]
    report: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)


def load_study(path: str | Path) -> StudyConfig:
    from breastfusion.config import read_yaml

    path = Path(path)
    raw = read_yaml(path, "study file")
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {path} must be a mapping (see jobs/demo.yaml)")
    for key, value in raw.items():
        if key not in _STUDY_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(_STUDY_KEYS)}")
        if value is not None and not isinstance(value, _STUDY_KEYS[key]):
            raise ConfigError(f"{path}: {key!r} has the wrong type ({type(value).__name__})")
    base_dir = path.resolve().parent
    data = dict(raw.get("data") or {})
    if ("manifest" in data) == ("synthetic" in data):
        raise ConfigError(f"{path}: data needs exactly one of 'manifest' or 'synthetic'")
    if "manifest" in data:
        data["manifest"] = str(_resolve(data["manifest"], base_dir))
    roi = {"mode": "detect", **(raw.get("roi") or {})}
    if roi["mode"] not in ROI_MODES:
        raise ConfigError(f"{path}: roi.mode {roi['mode']!r} is not one of {', '.join(ROI_MODES)}")
    backbones = dict(raw.get("backbones") or {})
    unknown = sorted(set(backbones) - {"dm", "us"})
    if unknown:
        raise ConfigError(f"{path}: backbones has unknown key {unknown[0]!r} (use dm, us)")
    backbones = {k: _space_ref(v, base_dir) for k, v in backbones.items() if v}
    fusion = _space_ref(raw.get("fusion"), base_dir) if raw.get("fusion") else None
    out = raw.get("out")
    study = StudyConfig(
        name=str(raw.get("name") or path.stem),
        path=path.resolve(),
        out=_resolve(out, Path.cwd()) if out else None,
        data=data,
        splits={"folds": 5, "holdout": 0.2, "seed": 0, **(raw.get("splits") or {})},
        roi=roi,
        base=dict(raw.get("base") or {}),
        backbones=backbones,
        fusion=fusion,
        final={"mode": "refit", **(raw.get("final") or {})},
        report=dict(raw.get("report") or {}),
        raw=raw,
    )
    _validate_spaces(study)
    return study


def _resolve(value: Any, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _space_ref(value: Any, base_dir: Path) -> Any:
    """A search space given as a path (relative to the study file) or inline."""
    if isinstance(value, str):
        return str(_resolve(value, base_dir))
    if isinstance(value, dict):
        return copy.deepcopy(value)
    raise ConfigError(f"a search space must be a path or a mapping, got {value!r}")


def _load_space(ref: Any, name: str = "search"):
    from breastfusion.distributed.space import load_space, parse_space

    return load_space(ref) if isinstance(ref, str) else parse_space(ref, default_name=name)


def _validate_spaces(study: StudyConfig) -> None:
    """Every search space must load before the first stage runs (fail in seconds, not hours)."""
    from breastfusion.config import Config

    base = Config().with_overrides(study.base)
    from breastfusion.distributed.space import validate_against_config

    refs = {f"backbones_{k}": v for k, v in study.backbones.items()}
    if study.fusion:
        refs["fusion"] = study.fusion
    for name, ref in refs.items():
        validate_against_config(_load_space(ref, name), base)


# --------------------------------------------------------------------------------------------
# stage machinery


@dataclass
class StageContext:
    study: StudyConfig
    root: Path
    debug: bool
    resume: bool
    echo: Callable[[str], None]
    hashes: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def dir(self, stage: str) -> Path:
        return self.root / stage


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    deps: tuple[str, ...]
    settings: Callable[[StageContext], dict[str, Any]]
    run: Callable[[StageContext, Path], dict[str, Any]]
    keep_partial: bool = False  # searches: an interrupted run can be resumed in place


def _stage_hash(ctx: StageContext, stage: Stage) -> str:
    return sha256_json(
        {
            "stage": stage.name,
            "settings": stage.settings(ctx),
            "debug": ctx.debug,
            "deps": {d: ctx.hashes[d] for d in stage.deps if d in ctx.hashes},
        }
    )


def _run_stage(ctx: StageContext, stage: Stage, index: int, total: int) -> None:
    out = ctx.dir(stage.name)
    digest = _stage_hash(ctx, stage)
    marker = out / STAGE_FILE
    prefix = f"[{index}/{total}] {stage.title}"
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("hash") == digest:
            ctx.hashes[stage.name] = digest
            ctx.outputs[stage.name] = done.get("outputs", {})
            ctx.echo(f"{prefix}: up to date, skipped")
            return
        marker.unlink()
    if out.exists() and not (stage.keep_partial and ctx.resume):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx.echo(f"{prefix} ...")
    started = time.monotonic()
    try:
        outputs = stage.run(ctx, out)
    except UserError as exc:
        raise UserError(f"stage {stage.name} failed: {exc.message}", details=exc.details) from exc
    seconds = time.monotonic() - started
    ctx.hashes[stage.name] = digest
    ctx.outputs[stage.name] = outputs
    atomic_write_json(
        marker,
        {"stage": stage.name, "hash": digest, "seconds": round(seconds, 1), "outputs": outputs},
    )
    ctx.echo(f"{prefix}: done in {seconds:.0f} s")


# --------------------------------------------------------------------------------------------
# the stages


def _data_settings(ctx: StageContext) -> dict[str, Any]:
    data = dict(ctx.study.data)
    if "manifest" in data:
        data["manifest_sha256"] = sha256_file(data["manifest"])
    return data


def _data_run(ctx: StageContext, out: Path) -> dict[str, Any]:
    from breastfusion.data.manifest import load_manifest, summarize

    data = ctx.study.data
    if "synthetic" in data:
        from breastfusion.data.synthetic import generate_cohort

        syn = {
            "patients": 120,
            "size": 128,
            "seed": 0,
            "difficulty": "standard",
            **(data["synthetic"] or {}),
        }
        manifest = generate_cohort(
            out / "cohort",
            n_patients=int(syn["patients"]),
            seed=int(syn["seed"]),
            size=int(syn["size"]),
            difficulty=str(syn["difficulty"]),
        )
    else:
        manifest = Path(data["manifest"])
    df = load_manifest(
        manifest,
        check_images=bool(data.get("check_images", True)),
        allow_outside=bool(data.get("allow_outside", False)),
    )
    summary = summarize(df)
    atomic_write_json(out / "cohort.json", summary)
    ctx.echo(
        f"    {summary['patients']} patients ({_class_text(summary)}), {summary['images']} images"
    )
    return {"manifest": str(manifest), "cohort": str(out / "cohort.json")}


def _class_text(summary: dict[str, Any]) -> str:
    per = summary.get("patients_per_class", {})
    return ", ".join(f"{n} {label}" for label, n in sorted(per.items()))


def _splits_settings(ctx: StageContext) -> dict[str, Any]:
    return dict(ctx.study.splits)


def _splits_run(ctx: StageContext, out: Path) -> dict[str, Any]:
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import make_splits, write_splits

    manifest = ctx.outputs["01_data"]["manifest"]
    df = load_manifest(manifest)
    s = ctx.study.splits
    splits = make_splits(
        df,
        folds=int(s["folds"]),
        holdout=float(s["holdout"]),
        seed=int(s["seed"]),
        manifest_sha256=sha256_file(manifest),
    )
    path = write_splits(splits, out / "splits.json")
    ctx.echo(f"    holdout {len(splits['holdout'])} patients, {len(splits['folds'])} folds")
    return {"splits": str(path)}


def _roi_settings(ctx: StageContext) -> dict[str, Any]:
    return dict(ctx.study.roi)


def _roi_run(ctx: StageContext, out: Path) -> dict[str, Any]:
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import load_splits

    manifest = ctx.outputs["01_data"]["manifest"]
    roi = ctx.study.roi
    if roi["mode"] == "none":
        return {"manifest": manifest, "mode": "none"}
    df = load_manifest(manifest)
    crop = {
        "margin": 0.1,
        "fallback": "centre",
        "conf": 0.25,
        "iou": 0.7,
        **(roi.get("crop") or {}),
    }
    detector = None
    result: dict[str, Any] = {"mode": roi["mode"]}
    if roi["mode"] == "detect":
        from breastfusion.roi.yolo import YoloDetector, train_detector

        splits = load_splits(ctx.outputs["02_splits"]["splits"], df)
        train = {"epochs": 300, "imgsz": 640, "batch": 8, "seed": 0, **(roi.get("train") or {})}
        if ctx.debug:
            train["epochs"] = min(int(train["epochs"]), 2)
        metrics = train_detector(
            df,
            out / "detector",
            holdout=list(splits.holdout),
            epochs=int(train["epochs"]),
            imgsz=int(train["imgsz"]),
            batch=int(train["batch"]),
            seed=int(train["seed"]),
            weights=train.get("weights"),
        )
        result["detector_metrics"] = {k: metrics.get(k) for k in ("mAP50", "mAP50-95")}
        detector = YoloDetector(
            out / "detector" / "weights" / "best.pt",
            conf=float(crop["conf"]),
            iou=float(crop["iou"]),
            imgsz=int(train["imgsz"]),
        )
        ctx.echo(
            f"    detector mAP50 {metrics.get('mAP50') or float('nan'):.3f} on "
            f"{metrics.get('n_images', {}).get('val', '?')} held-out development images"
        )
    from breastfusion.roi.crop import crop_manifest

    cropped = crop_manifest(
        df,
        out / "crops",
        detector,
        margin=float(crop["margin"]),
        fallback=str(crop["fallback"]),
        use_boxes=roi["mode"] == "boxes",
    )
    result["manifest"] = str(out / "crops" / "manifest.csv")
    result["roi_sources"] = dict(getattr(cropped, "counts", {}) or {})
    ctx.echo(f"    cropped US images: {result['roi_sources']}")
    return result


def _search_stage(key: str) -> tuple[Callable, Callable]:
    name = "fusion" if key == "fusion" else f"backbones_{key}"

    def ref(ctx: StageContext) -> Any:
        return ctx.study.fusion if key == "fusion" else ctx.study.backbones[key]

    def settings(ctx: StageContext) -> dict[str, Any]:
        space = _load_space(ref(ctx), name)
        return {"name": space.name, "space": space.source, "base": ctx.study.base}

    def run(ctx: StageContext, out: Path) -> dict[str, Any]:
        from breastfusion.config import Config
        from breastfusion.distributed.search import search

        space = _load_space(ref(ctx), name)
        resume = ctx.resume and (out / "experiment.json").exists()
        summary = search(
            space,
            ctx.outputs["03_roi"]["manifest"],
            ctx.outputs["02_splits"]["splits"],
            out,
            resume=resume,
            debug=ctx.debug,
            base=Config().with_overrides(ctx.study.base),
            echo=lambda line: ctx.echo(f"    {line}"),
        )
        return {"search_dir": str(out), "best_score": summary.best.get("score")}

    return settings, run


def _aggregate_run(ctx: StageContext, out: Path) -> dict[str, Any]:
    from breastfusion.evaluate.aggregate import aggregate

    dirs = [Path(ctx.outputs[s]["search_dir"]) for s in _SEARCH_STAGES if s in ctx.outputs]
    result = aggregate(dirs, out)
    return {
        "aggregate_dir": str(out),
        "best_config": str(out / "best_config.json"),
        "summary": getattr(result, "summary", None),
    }


MODALITY_NAMES = {"dm": "DM only", "us": "US only", "fusion": "DM+US"}


def _final_run(ctx: StageContext, out: Path) -> dict[str, Any]:
    """Refit the chosen configuration (the exported model), and the best configuration of each
    modality, then compare them on the holdout patients: the study's Table 3, with CIs and
    paired DeLong tests, on patients rather than image pairs."""
    from breastfusion.final import final_from_best

    aggregate = json.loads(
        (Path(ctx.outputs["07_aggregate"]["aggregate_dir"]) / "aggregate.json").read_text()
    )
    settings = {**ctx.study.final}
    if "gradcam_per_category" in ctx.study.report:
        settings.setdefault("gradcam_per_category", ctx.study.report["gradcam_per_category"])
    common = {
        "manifest": ctx.outputs["03_roi"]["manifest"],
        "splits": ctx.outputs["02_splits"]["splits"],
        "settings": settings,
        "debug": ctx.debug,
        "progress": lambda line: ctx.echo(f"    {line}"),
    }
    chosen = aggregate["best"]
    results = {}
    ctx.echo(f"    chosen: {chosen.get('trial')} ({chosen.get('modality', '?')})")
    results["chosen"] = final_from_best(chosen, out=out / "model", **common)
    per_modality = {}
    for modality, record in (aggregate.get("best_by_modality") or {}).items():
        if record.get("trial") == chosen.get("trial"):
            per_modality[modality] = out / "model"  # already refit above
            continue
        no_gradcam = {**common, "settings": {**settings, "gradcam_per_category": 0}}
        final_from_best(record, out=out / modality, **no_gradcam)
        per_modality[modality] = out / modality
    _compare_on_holdout(per_modality, out, settings, ctx.debug)
    for name in ("gradcam", "config.yaml"):
        src = out / "model" / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        elif src.is_file():
            shutil.copy2(src, out / name)
    return {"final_dir": str(out), "headline": results["chosen"].headline}


def _compare_on_holdout(
    per_modality: dict[str, Path], out: Path, settings: dict[str, Any], debug: bool
) -> None:
    """One metrics.json over every modality's holdout predictions (shared patients)."""
    import pandas as pd

    from breastfusion.evaluate.cli import evaluate_predictions, write_outputs

    def table(name: str) -> pd.DataFrame | None:
        parts = []
        for modality, folder in per_modality.items():
            path = folder / name
            if path.is_file():
                df = pd.read_csv(path, dtype={"patient_id": str})
                df["model"] = MODALITY_NAMES.get(modality, modality)
                parts.append(df[["model", "patient_id", "y_true", "y_score"]])
        return pd.concat(parts, ignore_index=True) if parts else None

    holdout = table("predictions_holdout.csv")
    development = table("oof_development.csv")
    target = settings.get("target_sensitivity")
    result, scores = evaluate_predictions(
        holdout,
        target_sensitivity=target if development is not None else None,
        validation=development if target is not None else None,
        n_boot=int(settings.get("bootstrap", 200 if debug else 2000)),
        seed=int(settings.get("seed", 0)),
        source="holdout predictions",
        validation_source="development out-of-fold predictions",
    )
    write_outputs(result, scores, out)
    from breastfusion.io import atomic_write_text

    atomic_write_text(out / "predictions_holdout.csv", holdout.to_csv(index=False))


def _report_run(ctx: StageContext, out: Path) -> dict[str, Any]:
    from breastfusion.report.html import LAYOUT_FILE, write_report

    # Tell the report (and a later `breastfusion report STUDY_DIR`) where each input lives.
    atomic_write_json(
        ctx.root / LAYOUT_FILE,
        {
            "manifest": ctx.outputs["01_data"]["manifest"],
            "splits": ctx.outputs["02_splits"]["splits"],
            "aggregate": ctx.outputs["07_aggregate"]["aggregate_dir"],
            "final": ctx.outputs["08_final"]["final_dir"],
            "study_yaml": str(ctx.study.path),
        },
    )
    path = write_report(ctx.root, out=out / "index.html")
    return {"report": str(path)}


_SEARCH_STAGES = ("04_backbones_dm", "05_backbones_us", "06_fusion")


def build_stages(study: StudyConfig) -> list[Stage]:
    none: Callable[[StageContext], dict[str, Any]] = lambda ctx: {}  # noqa: E731
    stages = [
        Stage("01_data", "data: validate the cohort", (), _data_settings, _data_run),
        Stage(
            "02_splits",
            "splits: holdout + patient-level folds",
            ("01_data",),
            _splits_settings,
            _splits_run,
        ),
        Stage(
            "03_roi",
            "ROI: US lesion detection and cropping",
            ("01_data", "02_splits"),
            _roi_settings,
            _roi_run,
        ),
    ]
    search_deps = ("02_splits", "03_roi")
    for key, name, title in (
        ("dm", "04_backbones_dm", "backbone comparison, DM only"),
        ("us", "05_backbones_us", "backbone comparison, US only"),
    ):
        if key in study.backbones:
            settings, run = _search_stage(key)
            stages.append(Stage(name, title, search_deps, settings, run, keep_partial=True))
    if study.fusion:
        settings, run = _search_stage("fusion")
        stages.append(
            Stage(
                "06_fusion",
                "fusion search (DM + US)",
                search_deps,
                settings,
                run,
                keep_partial=True,
            )
        )
    searches = tuple(s.name for s in stages if s.name in _SEARCH_STAGES)
    stages += [
        Stage(
            "07_aggregate",
            "aggregation: tables and the final configuration",
            searches,
            none,
            _aggregate_run,
        ),
        Stage(
            "08_final",
            "final model: refit, holdout, export, Grad-CAM",
            ("02_splits", "03_roi", "07_aggregate"),
            lambda ctx: dict(ctx.study.final),
            _final_run,
        ),
        Stage(
            "09_report",
            "report",
            ("01_data", "02_splits", "07_aggregate", "08_final"),
            lambda ctx: dict(ctx.study.report),
            _report_run,
        ),
    ]
    return stages


def run_study(
    study_path: str | Path,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    debug: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run every stage that is not up to date; return the report's path."""
    study = load_study(study_path)
    root = Path(out).resolve() if out else study.out or Path.cwd() / f"{study.name}_out"
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        root / "study.json",
        {"name": study.name, "source": str(study.path), "config": study.raw, "debug": debug},
    )
    ctx = StageContext(study=study, root=root, debug=debug, resume=resume, echo=echo)
    stages = build_stages(study)
    started = time.monotonic()
    echo(f"study {study.name} -> {root}")
    for i, stage in enumerate(stages, 1):
        _run_stage(ctx, stage, i, len(stages))
    report = Path(ctx.outputs["09_report"]["report"])
    echo(f"finished in {time.monotonic() - started:.0f} s")
    _echo_headline(ctx, echo)
    echo(f"report: {report}")
    return report


def _echo_headline(ctx: StageContext, echo: Callable[[str], None]) -> None:
    table = (
        Path(ctx.outputs.get("07_aggregate", {}).get("aggregate_dir", ""))
        / "tables"
        / "table3_modalities.md"
    )
    if table.is_file():
        echo(table.read_text(encoding="utf-8").rstrip())
    final = Path(ctx.outputs.get("08_final", {}).get("final_dir", "")) / "metrics.md"
    if final.is_file():
        echo(final.read_text(encoding="utf-8").rstrip())
