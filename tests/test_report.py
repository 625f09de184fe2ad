"""The HTML report: every section from a fake study folder, missing sections, escaping."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from breastfusion import runs
from breastfusion.errors import UserError
from breastfusion.evaluate.aggregate import aggregate
from breastfusion.evaluate.holdout import evaluate_predictions
from breastfusion.report.cli import report_command
from breastfusion.report.cv import write_markdown
from breastfusion.report.holdout import write_outputs
from breastfusion.report.html import SECTIONS, render_html, write_report
from breastfusion.report.inputs import GradcamImage, ReportInputs, read_study

# The fake search builder lives with the aggregation tests; import it by path so this works
# under any pytest import mode.
_spec = importlib.util.spec_from_file_location(
    "_agg_helpers", Path(__file__).with_name("test_aggregate.py")
)
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
make_search = _helpers.make_search
FOLDS, N_PER_FOLD = _helpers.FOLDS, _helpers.N_PER_FOLD

EVIL = '<script>alert("x")</script>&'
N_HOLDOUT = 40


def _png(path: Path, seed: int, size: int = 96) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _stage(study: runs.StudyDir, name: str, outputs: dict) -> None:
    study.write_stage(name, {"stage": name, "hash": "0" * 64, "outputs": outputs})


def _cohort(folder: Path) -> tuple[list, list]:
    """A manifest (+ synth_config.json: the built-in synthetic cohort) and its patients."""
    dev = [(f"p{k}{i:02d}", int(i % 3 == 0)) for k in FOLDS for i in range(N_PER_FOLD)]
    hold = [(f"h{i:03d}", int(i % 3 == 0)) for i in range(N_HOLDOUT)]
    rows = []
    for j, (pid, y) in enumerate(dev + hold):
        label = "malignant" if y else "benign"
        rows.append((pid, "DM", f"img/{pid}_dm.png", label))
        if j % 7:  # a few patients without ultrasound
            rows.append((pid, "US", f"img/{pid}_us.png", label))
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=["patient_id", "modality", "path", "label"]).to_csv(
        folder / "manifest.csv", index=False
    )
    (folder / "synth_config.json").write_text(json.dumps({"seed": 7}))
    return dev, hold


def _splits(dev: list, hold: list) -> dict:
    return {
        "folds": [
            {
                "val": [p for p, _ in dev if p.startswith(f"p{k}")],
                "n_val": N_PER_FOLD,
                "n_val_malignant": 10,
                "n_val_benign": 20,
            }
            for k in FOLDS
        ],
        "holdout": [p for p, _ in hold],
        "n_holdout": N_HOLDOUT,
        "n_holdout_malignant": sum(y for _, y in hold),
        "n_holdout_benign": N_HOLDOUT - sum(y for _, y in hold),
        "n_patients": len(dev) + N_HOLDOUT,
        "n_malignant": sum(y for _, y in dev + hold),
        "n_benign": len(dev) + N_HOLDOUT - sum(y for _, y in dev + hold),
        "n_development": len(dev),
        "holdout_fraction": 0.3,
        "seed": 0,
    }


def _searches(study: runs.StudyDir) -> list[Path]:
    dm = make_search(
        study.root,
        "04_backbones_dm",
        "dm",
        [
            {"backbone": "resnet18", "strength": 1.8, "logit": True},
            {"backbone": "resnet50", "strength": 1.2, "logit": True},
            {"backbone": "googlenet", "strength": 1.5, "logit": True},
            {"backbone": "vgg16", "strength": 4.0, "logit": True, "degenerate_folds": [2]},
        ],
    )
    us = make_search(
        study.root,
        "05_backbones_us",
        "us",
        [
            {"backbone": "resnet18", "strength": 2.0, "logit": True},
            {"backbone": "vgg16", "strength": 1.4, "logit": True},
        ],
    )
    fusion = make_search(
        study.root,
        "06_fusion",
        "fusion",
        [
            {"lr": 1e-4, "strength": 2.6, "logit": True},
            {"lr": 1e-3, "strength": 1.0, "status": "stopped", "logit": True},
        ],
    )
    for d in (dm, us, fusion):
        _stage(study, d.name, {"search_dir": d})
    return [dm, us, fusion]


def _final(study: runs.StudyDir, hold: list, oof: pd.DataFrame, evil: bool) -> None:
    final = study.stage("08_final")
    rng = np.random.default_rng(11)
    y = np.array([y for _, y in hold])
    preds = []
    models = {"DM only": 1.6, "US only": 1.9, ("DM+US" if not evil else EVIL): 2.8}
    for model, strength in models.items():
        z = strength * (y - 0.5) + rng.normal(0, 1, len(y))  # calibrated log-odds
        preds += [(model, pid, yy, s) for (pid, _), yy, s in zip(hold, y, z, strict=True)]
    pred_df = pd.DataFrame(preds, columns=["model", "patient_id", "y_true", "y_score"])
    final.mkdir(parents=True)
    pred_df.to_csv(final / "predictions_holdout.csv", index=False)
    if evil:
        oof["model"] = oof["model"].replace({"DM+US": EVIL})
    result, scores = evaluate_predictions(
        pred_df, n_boot=200, target_sensitivity=0.9, validation=oof.drop(columns="fold")
    )
    write_outputs(result, scores, final)
    g = final / "gradcam"
    _png(g / "true_positive_h000_dm.png", 1)
    _png(g / "true_positive_h000_us.png", 2)
    _png(g / "false_negative_h003_dm.png", 3, size=1200)  # gets downscaled
    _png(g / "raw_h000_dm.png", 4)
    index = pd.DataFrame(
        {
            "patient_id": ["h000", "h000", "h003"],
            "category": ["true_positive", "true_positive", "false_negative"],
            "branch": ["dm", "us", "dm"],
            "file": ["true_positive_h000_dm.png", "true_positive_h000_us.png",
                     "false_negative_h003_dm.png"],
            "raw_file": ["raw_h000_dm.png", "", ""],
            "score": [2.0, 2.0, -1.0],
        }
    )  # fmt: skip
    index.to_csv(g / "index.csv", index=False)
    if evil:
        (g / "captions.json").write_text(json.dumps({"true_positive_h000_dm.png": EVIL}))
    (final / "config.yaml").write_text(f"note: '{EVIL if evil else 'ok'}'\n")
    _stage(study, "08_final", {"final_dir": final})


def make_study(root: Path, *, evil: bool = False) -> Path:
    """A study folder as `breastfusion run` leaves it: study.json and every stage's
    stage.json with its outputs (paths relative to the study)."""
    study = runs.StudyDir(root / "study")
    study.root.mkdir(parents=True)
    (study.root / "study.json").write_text(
        json.dumps({"name": "demo", "config": {"name": "demo", "note": EVIL if evil else "ok"}})
    )
    cohort = study.stage("01_data") / "cohort"
    dev, hold = _cohort(cohort)
    _stage(study, "01_data", {"manifest": cohort / "manifest.csv"})
    study.stage("02_splits").mkdir()
    (study.stage("02_splits") / "splits.json").write_text(json.dumps(_splits(dev, hold)))
    _stage(study, "02_splits", {"splits": study.stage("02_splits") / "splits.json"})
    crops = study.stage("03_roi") / "crops"
    crops.mkdir(parents=True)
    (crops / "manifest.csv").write_text((cohort / "manifest.csv").read_text())
    summary = {"counts": {"detected": 90, "box": 0, "fallback": 14, "dropped": 0}, "n_us": 104,
               "fallback_share": 14 / 104, "mean_confidence": 0.61, "warnings": []}  # fmt: skip
    (crops / "roi_summary.json").write_text(json.dumps(summary))
    _stage(
        study,
        "03_roi",
        {"manifest": crops / "manifest.csv", "mode": "detect",
         "detector_metrics": {"mAP50": 0.734, "mAP50-95": 0.412}},
    )  # fmt: skip
    searches = _searches(study)
    agg_dir = study.stage("07_aggregate")
    res = aggregate(searches, agg_dir, n_boot=200)
    write_markdown(res, agg_dir)
    _stage(study, "07_aggregate", {"aggregate_dir": agg_dir})
    oof = pd.read_csv(agg_dir / "oof_best.csv", dtype={"patient_id": str})
    _final(study, hold, oof, evil)
    return study.root


class _Checker(HTMLParser):
    """Collects tags, images and text; fails on unbalanced sections (a cheap validity check)."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.scripts = 0
        self.section_ids: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        if tag == "section":
            self.section_ids.append(a.get("id", ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):  # noqa: ANN001
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def _check(page: str) -> _Checker:
    c = _Checker()
    c.feed(page)
    c.close()
    assert not c.errors, c.errors[:3]
    assert not c.stack, c.stack
    assert page.startswith("<!DOCTYPE html>")
    return c


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_study(tmp_path_factory.mktemp("report"))


def _section(page: str, sid: str) -> str:
    return re.search(rf'<section id="{sid}".*?</section>', page, re.S).group(0)


def test_full_report(study: Path) -> None:
    inp = read_study(study)
    inp.n_boot = 200
    path = write_report(study, inp)
    assert path == study / "09_report" / "index.html"
    page = path.read_text()
    c = _check(page)
    assert c.section_ids == ["answer", *[sid for sid, _, _ in SECTIONS]]
    assert 'class="missing"' not in page and 'class="problem"' not in page
    # Figures: ROC (holdout + OOF), 2 confusion, folds, calibration, Grad-CAM: 3 overlays and
    # the one raw image the index records.
    assert len(c.images) == 10
    assert all(src.startswith("data:image/png;base64,") for src in c.images)
    for src in c.images:
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    big = base64.b64decode(c.images[-1].split(",", 1)[1])
    from io import BytesIO

    from PIL import Image

    assert max(Image.open(BytesIO(big)).size) <= 768
    # Tables: the study's backbone rows, Table 3, the holdout metrics and the operating point.
    for text in ("ResNet-18", "GoogLeNet", "VGG16", "DM only", "US only", "DM+US", "± "):
        assert text in page
    assert "Table 1" in page and "Table 3" in page
    assert "paired DeLong" in page and "stratified paired DeLong" in page
    assert "fold-stratified AUC" in page and "pooled OOF AUC" in page
    assert "conditional on the fold models" in page
    assert "0.9" in _section(page, "operating-point")  # the target sensitivity
    assert "highest mean patient-level validation AUC" in page  # the rule
    assert "&quot;modality&quot;: &quot;fusion&quot;" in page  # the best config, escaped JSON
    # Models in the study's order, although metrics.json sorts its keys.
    holdout = _section(page, "modalities").split("Table 3")[0]
    assert holdout.index("DM only") < holdout.index("US only") < holdout.index("DM+US")
    # Cohort: patients without ultrasound are counted.
    assert "have only one modality" in page
    # The degenerate VGG16 DM configuration shows no number, only why.
    backbones = _section(page, "backbones")
    assert "degenerate" in backbones and "fold 2: 2 distinct score(s)" in backbones
    # ROI: detector mAP and fallbacks.
    roi = _section(page, "roi")
    assert "0.734" in roi and "13.5%" in roi and "fallback" in roi
    # Grad-CAM: the raw image beside the overlay, and a note where none was recorded.
    assert "raw image not recorded" in _section(page, "gradcam")
    # No script at all: the page is static.
    assert c.scripts == 0


def test_report_opens_with_the_answer(study: Path) -> None:
    inp = read_study(study)
    inp.n_boot = 100
    page = render_html(inp)
    answer = _section(page, "answer")
    assert page.index('id="answer"') < page.index('id="cohort"')
    assert "Synthetic data — demonstrates the pipeline, not clinical performance." in answer
    assert "built-in synthetic cohort (seed 7" in answer
    assert "130 patients (44 malignant, 86 benign)" in answer
    assert "holdout 40 patients" in answer
    metrics = json.loads((study / "08_final" / "metrics.json").read_text())
    for name in ("DM only", "US only", "DM+US"):
        e = metrics["models"][name]
        assert name in answer
        assert f"{e['auc']['value']:.3f}" in answer and f"{e['auc']['ci_low']:.3f}" in answer
        assert f"{e['threshold']:.3g}" in answer
    assert "sensitivity ≥ 0.9 on validation" in answer
    # Every warning: the degenerate configuration and the ROI fallbacks.
    assert "degenerate fold models were never chosen" in answer
    assert "04_backbones_dm/t0003_" in answer
    assert "detector found no lesion in 14 US image(s)" in answer


def test_report_reads_stage_records_not_a_layout(study: Path, tmp_path: Path) -> None:
    """A moved study still reports (stage outputs are relative); nothing is recomputed."""
    moved = tmp_path / "moved"
    shutil.copytree(study, moved)
    shutil.rmtree(study.parent / "study" / "09_report", ignore_errors=True)
    inp = read_study(moved)
    assert inp.aggregate is not None and inp.holdout_metrics is not None
    # Sources are shown relative to the study folder: they exist there, and the page names
    # neither the old place nor the new one.
    assert inp.sources and all((moved / v).exists() for v in inp.sources.values())
    page = render_html(inp)
    assert str(study) not in page and str(moved) not in page
    assert "built-in synthetic cohort (seed 7, 01_data/" in page
    # Without 07_aggregate's stage record the CV sections say "not run": no aggregation is
    # recomputed from the search folders that are still there.
    (moved / "07_aggregate" / "stage.json").unlink()
    inp = read_study(moved)
    assert inp.aggregate is None and inp.oof_predictions is None
    page = render_html(inp)
    assert "Not run: no aggregation" in _section(page, "backbones")
    assert not (moved / "aggregate").exists()


def test_missing_sections_say_not_run(tmp_path: Path) -> None:
    empty = tmp_path / "empty_study"
    empty.mkdir()
    (empty / "study.json").write_text(json.dumps({"name": "nothing yet"}))
    page = write_report(empty).read_text()
    c = _check(page)
    assert c.section_ids == ["answer", *[sid for sid, _, _ in SECTIONS]]
    assert page.count('class="missing"') >= len(SECTIONS)
    assert not c.images
    with pytest.raises(UserError, match="not a breastfusion study folder"):
        write_report(tmp_path)


def test_partial_study_and_unreadable_file(study: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(study / "study.json", partial / "study.json")
    for stage in ("01_data", "02_splits"):
        shutil.copytree(study / stage, partial / stage)
    (partial / "02_splits" / "splits.json").write_text("{not json")
    page = write_report(partial).read_text()
    _check(page)
    cohort = _section(page, "cohort")
    assert "missing" not in cohort and "malignant" in cohort
    splits = _section(page, "splits")
    assert 'class="problem"' in splits and "splits.json" in splits
    assert "splits.json" in _section(page, "answer")  # listed among the warnings


def test_old_aggregate_json_is_a_problem_not_a_crash(study: Path, tmp_path: Path) -> None:
    copy = tmp_path / "old"
    shutil.copytree(study, copy)
    path = copy / "07_aggregate" / "aggregate.json"
    data = json.loads(path.read_text())
    data.pop("format")
    path.write_text(json.dumps(data))
    page = render_html(read_study(copy))
    assert "written by an older breastfusion" in _section(page, "backbones")


def test_everything_from_data_is_escaped(tmp_path: Path) -> None:
    study = make_study(tmp_path, evil=True)
    inp = read_study(study)
    inp.n_boot = 100
    inp.configs["extra"] = {"note": EVIL}
    inp.notes.append(EVIL)
    inp.title = EVIL
    # Model names reach the HTML through the tables; the figures (pixels) are not needed here.
    inp.holdout_predictions = inp.oof_predictions = None
    page = render_html(inp)
    c = _check(page)
    assert c.scripts == 0
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page


def test_inputs_without_a_study_folder(tmp_path: Path) -> None:
    """A caller can fill ReportInputs itself; sections work from plain data."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    y[:2] = [0, 1]
    preds = pd.DataFrame(
        {
            "model": "$m_1 <b>",  # mathtext and HTML in a name: literal text in both
            "patient_id": [f"q{i}" for i in range(60)],
            "y_true": y,
            "y_score": np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1),
        }
    )
    img = _png(tmp_path / "g.png", 0)
    inp = ReportInputs(
        title="t", holdout_predictions=preds, gradcam=[GradcamImage(img, "a caption")], n_boot=100
    )
    path = write_report(tmp_path / "nowhere", inp)
    page = path.read_text()
    c = _check(page)
    assert len(c.images) == 4  # ROC, confusion, calibration, Grad-CAM
    assert 'class="problem"' not in page
    assert "a caption" in page
    broken = ReportInputs(gradcam=[GradcamImage(tmp_path / "nope.png")])
    assert "nope.png" in render_html(broken)  # a missing image is named, not fatal


def test_bad_predictions_shown_in_section(tmp_path: Path) -> None:
    preds = pd.DataFrame(
        {"model": "m", "patient_id": ["a", "b"], "y_true": [0, 1], "y_score": [0.2, "x"]}
    )
    page = render_html(ReportInputs(holdout_predictions=preds))
    _check(page)
    roc = _section(page, "roc")
    assert 'class="problem"' in roc and "not a number at line 3" in roc


def test_command(study: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    res = CliRunner().invoke(report_command, [str(study), "--out", str(out), "--bootstrap", "100"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output
    _check(out.read_text())
    res = CliRunner().invoke(report_command, [str(tmp_path / "missing")])
    assert isinstance(res.exception, UserError) and "no such study folder" in str(res.exception)
    res = CliRunner().invoke(report_command, [str(study), "--bootstrap", "5"])
    assert "--bootstrap must be at least 100" in str(res.exception)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_renders_in_headless_chromium(study: Path, tmp_path: Path) -> None:
    page = write_report(study, out=tmp_path / "index.html")
    shot = tmp_path / "report.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    im = Image.open(shot)
    assert im.size == (1200, 3000)
    assert len(np.unique(np.asarray(im.convert("L").resize((60, 150))))) > 20  # not blank
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], check=True, capture_output=True, timeout=120
    ).stdout.decode()
    # Chromium decoded every embedded figure (naturalWidth is not in the DOM; count the tags).
    assert dom.count('src="data:image/png;base64,') == 10
    assert "Grad-CAM gallery" in dom


def test_aggregate_result_as_input(tmp_path: Path) -> None:
    """A caller can pass aggregate()'s typed result straight in."""
    searches = _helpers.make_study_searches(tmp_path / "runs")
    res = aggregate(searches, tmp_path / "agg", n_boot=100)
    page = render_html(ReportInputs(aggregate=res, n_boot=100))
    _check(page)
    backbones = _section(page, "backbones")
    assert "ResNet-18" in backbones and 'class="missing"' not in backbones
    assert res.best["trial"] in page
