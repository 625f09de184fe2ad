"""The nine stages of a study (``breastfusion run``): what each one does, given its settings.

Each stage function takes the ``StageContext`` and its own folder and returns its outputs
(paths and a few numbers), which the runner (``breastfusion.study``) records in the stage's
``stage.json`` relative to the study root. Settings come only from the typed study config
(``ctx.study``, a ``breastfusion.study_config.StudyConfig``): no stage holds a default. The
final stage's work lives in ``breastfusion.study_final``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breastfusion import runs
from breastfusion.errors import UserError
from breastfusion.io import atomic_write_json, sha256_file
from breastfusion.study_config import STAGE_OF_SEARCH, StudyConfig

Outputs = dict[str, Any]


@dataclass
class StageContext:
    study: StudyConfig
    root: Path
    resume: bool
    echo: Callable[[str], None]
    resume_command: str = ""
    hashes: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Outputs] = field(default_factory=dict)
    ray_started: bool = False  # this study started the Ray its searches share (it stops it)

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def say(self, line: str) -> None:
        self.echo(f"    {line}")


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    deps: tuple[str, ...]
    run: Callable[[StageContext, Path], Outputs]
    keep_partial: bool = False  # searches: an interrupted run can be resumed in place


# -- 01 data ------------------------------------------------------------------------------------


def data_stage(ctx: StageContext, out: Path) -> Outputs:
    from breastfusion.data.manifest import load_manifest, summarize

    data = ctx.study.data
    if data.synthetic is not None:
        from breastfusion.data.synthetic import generate_cohort

        syn = data.synthetic
        manifest = generate_cohort(
            out / "cohort",
            n_patients=syn.patients,
            seed=syn.seed,
            size=syn.size,
            difficulty=syn.difficulty,
        )
    else:
        manifest = Path(str(data.manifest))
    df = load_manifest(manifest, check_images=data.check_images, allow_outside=data.allow_outside)
    summary = summarize(df)
    atomic_write_json(out / "cohort.json", summary)
    per = summary.get("patients_per_class", {})
    classes = ", ".join(f"{n} {label}" for label, n in sorted(per.items()))
    ctx.say(f"{summary['patients']} patients ({classes}), {summary['images']} images")
    return {"manifest": Path(manifest).resolve(), "cohort": out / "cohort.json"}


def _manifest(ctx: StageContext, stage: str = "01_data"):
    from breastfusion.data.manifest import load_manifest

    return load_manifest(ctx.outputs[stage]["manifest"], allow_outside=ctx.study.data.allow_outside)


# -- 02 splits ----------------------------------------------------------------------------------


def splits_stage(ctx: StageContext, out: Path) -> Outputs:
    from breastfusion.data.splits import make_splits, write_splits

    manifest = ctx.outputs["01_data"]["manifest"]
    s = ctx.study.splits
    df = _manifest(ctx)
    if s.near_duplicates == "refuse":
        from breastfusion.data import near_duplicates as nd

        # The same check as ``breastfusion split --near-duplicates``; its error names the key.
        nd.refuse_across_patients(nd.manifest_pairs(df, source=str(manifest)), str(manifest))
        ctx.say("near duplicates: none across patients")
    splits = make_splits(
        df,
        folds=s.folds,
        holdout=s.holdout,
        seed=s.seed,
        manifest_sha256=sha256_file(manifest),
    )
    path = write_splits(splits, out / "splits.json")
    ctx.say(f"holdout {len(splits['holdout'])} patients, {len(splits['folds'])} folds")
    return {"splits": path}


# -- 03 ROI -------------------------------------------------------------------------------------


def roi_stage(ctx: StageContext, out: Path) -> Outputs:
    roi = ctx.study.roi
    if roi.mode == "none":
        return {"manifest": ctx.outputs["01_data"]["manifest"], "mode": "none"}
    from breastfusion.data.splits import load_splits
    from breastfusion.roi.crop import crop_manifest

    df = _manifest(ctx)
    holdout = list(load_splits(ctx.outputs["02_splits"]["splits"], df).holdout)
    result: Outputs = {"mode": roi.mode}
    detector = weights = None
    if roi.mode == "detect":
        weights = _train_detector(ctx, df, holdout, out, result)
        from breastfusion.roi.yolo import YoloDetector

        detector = YoloDetector(
            weights, roi.crop, imgsz=roi.train.imgsz, work_dir=out / "detector" / "predict"
        )
    cropped = crop_manifest(
        df,
        out / "crops",
        detector,
        roi.crop,
        use_boxes=roi.mode == "boxes",
        holdout=holdout,
        source_manifest=ctx.outputs["01_data"]["manifest"],
        weights=weights,
    )
    shutil.rmtree(out / "detector" / "predict", ignore_errors=True)
    result["manifest"] = cropped.manifest
    result["roi_summary"] = cropped.summary_json
    result["roi_sources"] = cropped.counts
    # The summary's lines end with its warnings (a high no-detection share, unlinked DM
    # files): the study log must show them, not only roi_summary.json.
    for line in cropped.summary.lines():
        ctx.say(line)
    return result


def _train_detector(
    ctx: StageContext, df: Any, holdout: list[str], out: Path, result: Outputs
) -> Path:
    from breastfusion.roi.bundle import export_detector
    from breastfusion.roi.train import format_progress, train_detector

    roi = ctx.study.roi
    metrics = train_detector(
        df,
        out / "detector",
        roi.train,
        holdout=holdout,
        source={"manifest": ctx.outputs["01_data"]["manifest"]},
        progress=lambda p: ctx.say(format_progress(p)),
    )
    weights = out / "detector" / "weights" / "best.pt"
    # The bundle predict and final read: the study's detector with its crop rule.
    result["detector_bundle"] = export_detector(
        out / "bundle", weights, roi.train, roi.crop, metrics
    ).parent
    result["detector_metrics"] = {k: metrics.get(k) for k in ("mAP50", "mAP50-95")}
    n_val = metrics.get("n_images", {}).get("val", "?")
    ctx.say(f"detector mAP50 {number(metrics.get('mAP50'))} on {n_val} held-out development images")
    return weights


# -- 04-06 searches -----------------------------------------------------------------------------


def search_stage(key: str) -> Callable[[StageContext, Path], Outputs]:
    def run(ctx: StageContext, out: Path) -> Outputs:
        from breastfusion.distributed.search import search

        share_ray(ctx)
        folder = runs.SearchDir(out)
        summary = search(
            ctx.study.space_for_search(key),
            ctx.outputs["03_roi"]["manifest"],
            ctx.outputs["02_splits"]["splits"],
            out,
            resume=ctx.resume and folder.is_search(),
            debug=ctx.study.debug,
            base=ctx.study.base_config(),
            echo=ctx.say,
            mlflow_uri=ctx.study.tracking.mlflow_uri,
            resume_command=ctx.resume_command,
        )
        check_search_finished(folder, ctx.resume_command)
        return {"search_dir": out, "best_score": summary.best.get("score")}

    return run


def share_ray(ctx: StageContext) -> None:
    """Start the private local Ray once for every search of the study (each search then joins
    it instead of paying Ray's start and stop); the study's own signal handlers stay in place.
    Under ``RAY_ADDRESS`` (a cluster) or an already running Ray nothing is started."""
    import signal

    from breastfusion.distributed.ray_local import init_ray

    if ctx.ray_started:
        return
    dashboard = not ctx.study.debug and any(
        s.space.workers > 1 for s in ctx.study.searches.values()
    )
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ctx.ray_started = init_ray(dashboard=dashboard)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def check_search_finished(folder: runs.SearchDir, resume_command: str) -> None:
    """Never record a search as done unless it chose a trial that finished every fold (an
    interrupted Ray Tune run can return normally with unfinished trials)."""
    trial = None
    if folder.best_path.is_file():
        trial = folder.best().get("trial")
    complete = 0
    if folder.trials_path.is_file():
        table = folder.trials_table()
        complete = int((table["status"].astype(str) == "complete").sum())
    if trial is None or complete == 0:
        raise UserError(
            f"{folder.path}: the search has no trial that finished every fold (it was "
            "interrupted, or every trial failed), so the stage is not marked done; "
            f"continue it with: {resume_command}"
        )


# -- 07 aggregate -------------------------------------------------------------------------------


def aggregate_stage(ctx: StageContext, out: Path) -> Outputs:
    from breastfusion.evaluate.aggregate import aggregate
    from breastfusion.report.cv import write_markdown

    dirs = [Path(ctx.outputs[s]["search_dir"]) for s in runs.SEARCH_STAGES if s in ctx.outputs]
    a = ctx.study.aggregate
    result = aggregate(
        dirs,
        out,
        threshold=a.threshold,
        n_boot=a.bootstrap,
        seed=a.seed,
        tie_tolerance=a.tie_tolerance,
        best_from=a.best_from,
        score_scale=a.score_scale,
        prefix="aggregate",
    )
    # summary.md and tables/*.md: the tables readable without the HTML report, as
    # ``breastfusion aggregate`` writes them.
    markdown = write_markdown(result, out)
    for w in result.warnings:
        ctx.say(f"warning: {w}")
    return {
        "aggregate_dir": out,
        "best_config": out / "best_config.json",
        "summary": markdown["summary.md"],
    }


# -- 08 final -----------------------------------------------------------------------------------


def final_stage(ctx: StageContext, out: Path) -> Outputs:
    """The final models and the holdout comparison (``breastfusion.study_final``)."""
    from breastfusion import study_final

    return study_final.final_stage(ctx, out)


# -- 09 report ----------------------------------------------------------------------------------


def report_stage(ctx: StageContext, out: Path) -> Outputs:
    """The report reads the study through its stage records (``report.inputs.read_study``)."""
    from breastfusion.report.html import write_report
    from breastfusion.report.inputs import read_study

    inputs = read_study(ctx.root)
    inputs.n_boot = ctx.study.report.bootstrap
    return {"report": write_report(ctx.root, inputs, out=out / "index.html")}


# -- the list -----------------------------------------------------------------------------------

_SEARCH_TITLES = {
    "dm": "backbone comparison, DM only",
    "us": "backbone comparison, US only",
    "fusion": "fusion search (DM + US)",
}


def build_stages(study: StudyConfig) -> list[Stage]:
    stages = [
        Stage("01_data", "data: validate the cohort", (), data_stage),
        Stage("02_splits", "splits: holdout + patient-level folds", ("01_data",), splits_stage),
        Stage(
            "03_roi", "ROI: US lesion detection and cropping", ("01_data", "02_splits"), roi_stage
        ),
    ]
    for key, name in STAGE_OF_SEARCH.items():
        if key in study.searches:
            deps = ("02_splits", "03_roi")
            stages.append(Stage(name, _SEARCH_TITLES[key], deps, search_stage(key), True))
    searches = tuple(s.name for s in stages if s.name in runs.SEARCH_STAGES)
    stages += [
        Stage(
            "07_aggregate",
            "aggregation: tables and the final configuration",
            searches,
            aggregate_stage,
        ),
        Stage(
            "08_final",
            "final models (refit or fold ensemble), holdout, export, Grad-CAM",
            ("02_splits", "03_roi", "07_aggregate"),
            final_stage,
        ),
        Stage(
            "09_report",
            "report",
            ("01_data", "02_splits", "07_aggregate", "08_final"),
            report_stage,
        ),
    ]
    return stages


def number(value: Any) -> str:
    """A number for people: 3 decimals, or 3 significant digits when small or large (never
    0.000 for 4.5e-07)."""
    if value is None:
        return "n/a"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if x != x:
        return "n/a"
    return f"{x:.3f}" if x == 0 or 0.01 <= abs(x) < 1e4 else f"{x:.3g}"
