"""The main job: one study from manifest (or synthetic cohort) to HTML report, as stages.

``breastfusion run STUDY.yaml`` runs, in order (``breastfusion.study_stages``)::

    01_data       validate the manifest, or generate the synthetic cohort
    02_splits     holdout + patient-level stratified K folds (splits.json)
    03_roi        US lesion detector (YOLOv8) trained and applied → cropped manifest and the
                  detector bundle (or manifest boxes, or no cropping: ``roi.mode``)
    04_backbones_dm, 05_backbones_us   the study's backbone comparison per modality (searches)
    06_fusion     Optuna search for the fusion model over the folds
    07_aggregate  tables like the study's Tables 1–3, and the chosen final configuration
    08_final      refit, holdout evaluation (CIs, DeLong, operating point), export, Grad-CAM
    09_report     report/index.html

Each stage writes under ``STUDY_DIR/<stage>/`` and, last, a ``stage.json`` (``runs.StudyDir``)
holding the hash of its inputs — its resolved settings (``StudyConfig.stage_settings``, every
default filled in) and the hashes of the stages it reads — and its outputs, stored relative to
the study root so a moved study still works. A matching stage is skipped; a changed setting
re-runs that stage and every stage downstream of it, and the run says what changed.

Nothing unfinished looks finished: a stage that fails or is interrupted (Ctrl-C: exit 130,
SIGTERM: exit 143) leaves no ``stage.json``, and the run prints the command that continues it.
A search stage is recorded done only when its search chose a trial that finished every fold;
with ``--resume`` an interrupted search continues in place instead of starting again.

One writer per study folder (``fsguard.FolderLock``), and a study writes only into a folder
it owns (``fsguard.claim``). It clears a stage folder only when every entry in it was made by
an earlier run of that stage (recorded in ``.breastfusion-stages.json``): a file the study did
not make is never deleted — the stage is refused, naming it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shlex
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from breastfusion import fsguard, runs
from breastfusion.errors import Interrupted, Terminated, UserError
from breastfusion.io import atomic_write_json, ensure_dir, sha256_json
from breastfusion.study_config import StudyConfig, load_study
from breastfusion.study_stages import Stage, StageContext, build_stages

log = logging.getLogger(__name__)

STATE_FILE = ".breastfusion-stages.json"  # what each stage folder holds that the study made
PAUSE_ENV = "BREASTFUSION_STUDY_PAUSE"  # tests: "STAGE:FOLDER" parks the run at STAGE's start


def run_study(
    study_path: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    debug: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run every stage that is not up to date; return the report's path."""
    study = load_study(study_path)
    if debug:
        study = study.for_debug()
    root = Path(out).resolve() if out else study.out or Path.cwd() / f"{study.name}_out"
    _check_claimable(root)
    fsguard.claim(root, "study")
    with fsguard.FolderLock(root, "study"):
        command = resume_command(study_path, root, study.debug)
        ctx = StageContext(study, root, resume, echo, resume_command=command)
        atomic_write_json(runs.StudyDir(root).study_file, _study_record(study, root))
        stages = build_stages(study)
        started = time.monotonic()
        echo(f"study {study.name} -> {root}")
        ran = 0
        current = stages[0].name
        try:
            for i, stage in enumerate(stages, 1):
                current = stage.name
                ran += _run_stage(ctx, stage, i, len(stages))
        except (KeyboardInterrupt, Interrupted) as exc:
            code = 143 if isinstance(exc, Terminated) else getattr(exc, "exit_code", 130)
            raise Interrupted(
                f"interrupted during stage {current}; nothing unfinished was marked done. "
                f"Continue with: {command}",
                exit_code=code,
            ) from None
        finally:
            if ctx.ray_started:
                from breastfusion.distributed.ray_local import shutdown_ray

                shutdown_ray()
        report = Path(ctx.outputs["09_report"]["report"])
        echo(f"finished in {time.monotonic() - started:.0f} s")
        for line in headline(ctx.dir("08_final") / "metrics.json"):
            echo(line)
        if study.tracking.mlflow_uri:
            from breastfusion.study_tracking import log_study

            log_study(ctx, changed=ran > 0)
        echo(f"report: {report}")
    return report


def resume_command(study_path: str | os.PathLike, root: Path, debug: bool) -> str:
    words = ["breastfusion", "run", str(study_path), "--out", str(root), "--resume"]
    return shlex.join(words + (["--debug"] if debug else []))


def _check_claimable(root: Path) -> None:
    """Refuse, before touching it, a non-empty folder that is not a breastfusion study."""
    if root.exists() and not root.is_dir():
        raise UserError(f"cannot use {root} as a study folder: it is a file")
    if fsguard.owner(root) is None and fsguard.foreign_entries(root):
        shown = ", ".join(fsguard.foreign_entries(root)[:5])
        raise UserError(
            f"{root} is not empty ({shown}) and is not a breastfusion study folder; a study "
            "writes only into a new or empty folder, or one an earlier study made"
        )


def _study_record(study: StudyConfig, root: Path) -> dict[str, Any]:
    source = runs.StudyDir(root).relative({"source": study.path})["source"]
    return {
        "name": study.name,
        "source": source,  # the study file: relative to the root when inside it
        "config": study.raw,  # as written (paths relative to the study file)
        "resolved": study.to_dict(portable=True),
        "debug": study.debug,
    }


# -- one stage ----------------------------------------------------------------------------------


def _run_stage(ctx: StageContext, stage: Stage, index: int, total: int) -> int:
    """Skip the stage when up to date (0), else run it and record it (1)."""
    study_dir = runs.StudyDir(ctx.root)
    settings = ctx.study.stage_settings(stage.name)
    deps = {d: ctx.hashes[d] for d in stage.deps if d in ctx.hashes}
    digest = sha256_json({"stage": stage.name, "settings": settings, "deps": deps})
    prefix = f"[{index}/{total}] {stage.title}"
    record = study_dir.stage_record(stage.name)
    if _up_to_date(ctx, stage.name, record, digest, prefix):
        return 0
    if record is not None and record.get("hash") != digest:
        ctx.echo(f"{prefix}: {changes(record, settings, deps)}; re-running")
    state = _read_state(ctx.root)
    out = ctx.dir(stage.name)
    keep = stage.keep_partial and ctx.resume and record is None and out.is_dir()
    if keep:
        _check_same_partial(state.get(stage.name) or {}, stage.name, settings, deps)
    else:
        _clear_stage_dir(out, state.get(stage.name))
    ensure_dir(out)
    entry = {"hash": digest, "settings": settings, "deps": deps, "state": "running"}
    _write_state(ctx.root, {**state, stage.name: {**entry, "entries": None}})
    ctx.echo(f"{prefix} ..." + (" (resuming)" if keep else ""))
    started = time.monotonic()
    outcome = "failed"
    try:
        _pause_hook(stage.name)
        outputs = stage.run(ctx, out)
        outcome = "done"
    except (KeyboardInterrupt, Interrupted):
        outcome = "interrupted"
        raise
    except UserError as exc:
        raise UserError(f"stage {stage.name} failed: {exc.message}", details=exc.details) from exc
    finally:
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        state = _read_state(ctx.root)
        _write_state(
            ctx.root, {**state, stage.name: {**entry, "state": outcome, "entries": entries}}
        )
    seconds = time.monotonic() - started
    ctx.hashes[stage.name] = digest
    study_dir.write_stage(
        stage.name,
        {
            "stage": stage.name,
            "hash": digest,
            "settings": settings,
            "deps": deps,
            "seconds": seconds,
            "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "outputs": outputs,
        },
    )
    ctx.outputs[stage.name] = study_dir.stage_record(stage.name)["outputs"]
    ctx.echo(f"{prefix}: done in {seconds:.0f} s")
    return 1


def _up_to_date(
    ctx: StageContext, name: str, record: Mapping[str, Any] | None, digest: str, prefix: str
) -> bool:
    """A finished stage with this hash whose outputs are all still there: reuse it."""
    if record is None or record.get("hash") != digest:
        return False
    missing = _missing_outputs(record.get("outputs") or {}, ctx.root)
    if missing:
        ctx.echo(f"{prefix}: outputs missing ({', '.join(missing)}); re-running")
        return False
    ctx.hashes[name] = digest
    ctx.outputs[name] = dict(record.get("outputs") or {})
    ctx.echo(f"{prefix}: up to date, skipped")
    return True


def _missing_outputs(outputs: Mapping[str, Any], root: Path) -> list[str]:
    """Recorded output paths inside the study that no longer exist (a deleted result)."""
    inside = str(root.resolve()) + os.sep
    return sorted(
        k
        for k, v in outputs.items()
        if isinstance(v, str) and v.startswith(inside) and not os.path.exists(v)
    )


def _clear_stage_dir(out: Path, made: Mapping[str, Any] | None) -> None:
    """Empty a stage folder for a fresh run — only when the study made everything in it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} is a file; a study stage needs that name for its folder")
    present = {p.name for p in out.iterdir()} - {runs.STAGE_FILE}
    known = set((made or {}).get("entries") or [])
    foreign = sorted(present - known)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        why = (
            "that this study did not make"
            if made is not None and made.get("entries") is not None
            else "from a run that ended without recording what it wrote (killed?)"
        )
        raise UserError(
            f"{out} must be cleared to re-run the stage, but it holds {shown} {why}; "
            "move those away (or delete the folder yourself) and run again"
        )
    shutil.rmtree(out)


def _check_same_partial(
    made: Mapping[str, Any], stage: str, settings: Mapping[str, Any], deps: Mapping[str, str]
) -> None:
    """``--resume`` continues a partial search only under the settings it started with."""
    if not made.get("hash"):
        return
    old = {"settings": made.get("settings"), "deps": made.get("deps")}
    if sha256_json(old) != sha256_json({"settings": dict(settings), "deps": dict(deps)}):
        raise UserError(
            f"stage {stage} was interrupted under other settings "
            f"({changes(made, settings, deps)}); restore them to continue it, or run without "
            "--resume to start the stage again"
        )


def changes(record: Mapping[str, Any], settings: Mapping[str, Any], deps: Mapping[str, str]) -> str:
    """What differs from a recorded stage, in words (settings by dotted key, and inputs)."""
    old = record.get("settings")
    if not isinstance(old, Mapping):
        return "settings changed (the stage was recorded by an earlier version)"
    before, after = _flatten(old), _flatten(settings)
    diffs = [
        f"{k}: {_short(before.get(k, '(unset)'))} -> {_short(after.get(k, '(unset)'))}"
        for k in sorted(set(before) | set(after))
        if before.get(k, "(unset)") != after.get(k, "(unset)")
    ]
    parts = []
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        parts.append(f"settings changed ({shown})")
    old_deps = record.get("deps") or {}
    moved = [d for d in deps if old_deps.get(d) != deps[d]]
    if moved:
        parts.append(f"input changed: {', '.join(moved)}")
    return "; ".join(parts) or "inputs changed"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_state(root: Path) -> dict[str, Any]:
    try:
        return runs.read_json(root / STATE_FILE, "study state file")
    except UserError:
        return {}


def _write_state(root: Path, state: Mapping[str, Any]) -> None:
    atomic_write_json(root / STATE_FILE, dict(state))


def _pause_hook(stage: str) -> None:
    """Tests only (``PAUSE_ENV`` = ``STAGE:FOLDER``): park at the start of STAGE, after writing
    ``FOLDER/paused-STAGE.<pid>``, until a signal ends the process. A no-op otherwise."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, folder = spec.partition(":")
    if name != stage or not folder:
        return
    (Path(folder) / f"paused-{stage}.{os.getpid()}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise UserError(f"{PAUSE_ENV}: nobody stopped the run parked at stage {stage}")


# -- the result ---------------------------------------------------------------------------------


def headline(metrics_path: Path) -> list[str]:
    """The holdout headline of ``08_final/metrics.json``: one line per model and per paired
    comparison (numbers to 3 decimals, or 3 significant digits when small)."""
    from breastfusion.study_stages import number

    try:
        metrics = runs.read_json(metrics_path, "holdout metrics")
    except UserError:
        return []
    lines = []
    for name, m in (metrics.get("models") or {}).items():
        if not isinstance(m, Mapping):
            continue

        def ci(key: str, m: Mapping[str, Any] = m) -> str:
            d = m.get(key) or {}
            if not isinstance(d, Mapping):
                return number(d)
            return (
                f"{number(d.get('value'))} ({number(d.get('ci_low'))}-{number(d.get('ci_high'))})"
            )

        threshold = number(m.get("threshold"))
        if m.get("threshold_probability") is not None:
            threshold += f" (probability {number(m.get('threshold_probability'))})"
        lines.append(
            f"holdout {name}: AUC {ci('auc')}, sensitivity {ci('sensitivity')}, "
            f"specificity {ci('specificity')} at threshold {threshold}; "
            f"{m.get('n_patients', '?')} patients, {m.get('n_malignant', '?')} malignant"
        )
    for c in metrics.get("comparisons") or []:
        if isinstance(c, Mapping):
            lines.append(
                f"holdout {c.get('a')} vs {c.get('b')}: AUC difference "
                f"{number(c.get('difference'))}, DeLong p = {number(c.get('p_value'))}"
            )
    return lines
