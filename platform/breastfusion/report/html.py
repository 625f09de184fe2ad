"""One self-contained HTML page for a study: the answer first, then every section.

Every figure is a base64 PNG inside ``index.html``, so the page can be mailed or archived as
one file. The page is built from a typed ``ReportInputs`` (``report.inputs.read_study`` reads
a study folder through its stage records); every section is optional and a missing one says
"not run" instead of failing, so a half-finished study still gets a report. Everything that
comes from data (model names, trial names, patient ids, config values, captions) is
HTML-escaped. Output: ``STUDY_DIR/09_report/index.html`` (``runs.StudyDir.report_path``) or
the given path, written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from breastfusion import runs
from breastfusion.errors import UserError
from breastfusion.evaluate.results import AggregateResult
from breastfusion.io import atomic_write_text
from breastfusion.report import figsections as FS
from breastfusion.report import sections as SE
from breastfusion.report.headline import headline
from breastfusion.report.inputs import GradcamImage, ReportInputs, read_study
from breastfusion.report.table import esc

__all__ = [
    "SECTIONS",
    "GradcamImage",
    "ReportInputs",
    "read_study",
    "render_html",
    "write_report",
]

log = logging.getLogger(__name__)

SECTIONS: list[tuple[str, str, Callable[[ReportInputs], str]]] = [
    ("cohort", "Cohort summary", SE.section_cohort),
    ("splits", "Split summary", SE.section_splits),
    ("roi", "Lesion ROIs (ultrasound)", SE.section_roi),
    ("backbones", "Backbone comparison (cross-validation)", SE.section_backbones),
    ("modalities", "Modality comparison", SE.section_modalities),
    ("roc", "ROC curves with 95% bands", FS.section_roc),
    ("confusion", "Normalised confusion matrices", FS.section_confusion),
    ("folds", "Fold comparison", FS.section_folds),
    ("operating-point", "Operating point", SE.section_operating_point),
    ("calibration", "Calibration", FS.section_calibration),
    ("gradcam", "Grad-CAM gallery", FS.section_gradcam),
    ("configs", "Exact configurations", SE.section_configs),
]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
 max-width:1180px;padding:0 24px 48px;color:#1d2430;line-height:1.45}
header{border-bottom:2px solid #2b6cb0;margin-bottom:8px}
h1{font-size:1.6em;margin:24px 0 4px}h2{font-size:1.25em;margin-top:36px;
 border-bottom:1px solid #d5dbe3;padding-bottom:4px}h3{font-size:1.02em;margin:18px 0 6px}
nav ol{columns:3;font-size:.92em;padding-left:20px}
table{border-collapse:collapse;margin:8px 0;font-size:.86em}
th,td{border:1px solid #d5dbe3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#edf2f7}tbody tr:nth-child(even){background:#f8fafc}
.tablewrap{overflow-x:auto;max-width:100%}
table.metrics td{white-space:nowrap}
table.metrics td:first-child,table.metrics td:last-child{white-space:normal}
td code{word-break:break-all;font-size:.92em}table.metrics td:last-child{min-width:160px}
.missing{color:#8a6d3b;background:#fcf8e3;border:1px solid #f0e1a1;padding:6px 10px;
 border-radius:4px;display:inline-block}
.problem{color:#a94442;background:#f2dede;border:1px solid #e4b9b9;padding:6px 10px;
 border-radius:4px}
.answer{background:#f0f6fc;border:2px solid #2b6cb0;border-radius:6px;padding:4px 16px 10px;
 margin-top:16px}.answer h2{margin-top:8px;border:0}
.banner{background:#fff4e5;border:1px solid #f0b35a;color:#7a4a00;padding:6px 10px;
 font-weight:600;border-radius:4px}
.warnings{background:#fff8f0;border:1px solid #f0c8a0;padding:6px 10px;border-radius:4px;
 font-size:.9em}.warn{color:#9c4a00}.flag{color:#a94442;font-weight:600}
.note{font-size:.85em;color:#4a5568}
.ci{font-size:.85em;color:#4a5568}
pre{background:#f7fafc;border:1px solid #d5dbe3;padding:10px;font-size:.8em;overflow:auto;
 max-height:480px}
figure{margin:8px 12px 8px 0;display:inline-block;vertical-align:top}
figure img{max-width:100%;border:1px solid #e2e8f0}
figcaption{font-size:.82em;color:#4a5568;max-width:560px}
.gallery figure.tile{width:420px}.pair{display:flex;gap:4px}.pair img{width:206px}
.pair .note{width:206px;display:flex;align-items:center;justify-content:center;
 border:1px dashed #cbd5e0}
footer{margin-top:40px;font-size:.8em;color:#718096}
"""


def render_html(inp: ReportInputs) -> str:
    """The whole page as a string (sections that fail show their error instead)."""
    return _render(inp)[0]


def _section(inp: ReportInputs, sid: str, fn: Callable[[ReportInputs], str]) -> str:
    content = ""
    if sid in inp.problems:
        content += f'<p class="problem">{esc(inp.problems[sid])}</p>'
    try:
        content += fn(inp)
    except UserError as exc:
        content += f'<p class="problem">Could not draw this section: {esc(exc)}</p>'
    except Exception as exc:  # a report must still render the other sections
        log.exception("report section %s failed", sid)
        content += (
            f'<p class="problem">Could not draw this section '
            f"({esc(type(exc).__name__)}: {esc(exc)})</p>"
        )
    return content


def _render(inp: ReportInputs) -> tuple[str, list[str]]:
    """(page, titles of the sections shown as "not run" or failed)."""
    if isinstance(inp.aggregate, dict):  # aggregate.json as a dict
        inp.aggregate = AggregateResult.from_dict(inp.aggregate)
    body, not_run = [], []
    for sid, title, fn in SECTIONS:
        content = _section(inp, sid, fn)
        if 'class="missing"' in content or 'class="problem"' in content:
            not_run.append(title)
        body.append(f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>')
    toc = "".join(f'<li><a href="#{sid}">{esc(title)}</a></li>' for sid, title, _ in SECTIONS)
    notes = "".join(f"<p>{esc(n)}</p>" for n in inp.notes)
    sources = ""
    if inp.sources:
        listed = "; ".join(
            f"{esc(k)}: <code>{esc(v)}</code>" for k, v in sorted(inp.sources.items())
        )
        sources = f"<p>Inputs (paths relative to the study folder): {listed}</p>"
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(inp.title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{esc(inp.title)}</h1>"
        '<p class="note">Patient-level results. Research use only, not for diagnosis.</p>'
        f"{notes}</header>{headline(inp)}<nav><ol>{toc}</ol></nav>{''.join(body)}"
        f"<footer>{sources}Generated by breastfusion.</footer></body></html>\n"
    )
    return page, not_run


def write_report(
    study_dir: Path, inputs: ReportInputs | None = None, *, out: Path | None = None
) -> Path:
    """Write the report of ``study_dir`` to ``out`` (default: the study's
    ``09_report/index.html``); inputs default to ``read_study(study_dir)``. Returns the path.

    Never fails for a missing section; raises ``UserError`` when ``study_dir`` is not a study
    folder and no ``inputs`` are given.
    """
    return write_page(study_dir, inputs, out)[0]


def write_page(
    study_dir: Path, inputs: ReportInputs | None, out: Path | None
) -> tuple[Path, list[str]]:
    """``write_report`` that also returns the titles of the sections not run."""
    inp = inputs if inputs is not None else read_study(Path(study_dir))
    page, not_run = _render(inp)
    target = Path(out) if out is not None else runs.StudyDir(Path(study_dir)).report_path
    return atomic_write_text(target, page), not_run
