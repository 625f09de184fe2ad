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

from breastfusion.errors import UserError
from breastfusion.evaluate.aggregate import aggregate
from breastfusion.evaluate.cli import evaluate_predictions, write_outputs
from breastfusion.report.html import (
    SECTIONS,
    GradcamImage,
    ReportInputs,
    discover_inputs,
    render_html,
    report_command,
    write_report,
)

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


def make_study(root: Path, *, evil: bool = False) -> Path:
    """A study folder in the layout ``discover_inputs`` documents, every section filled."""
    study = root / "study"
    dm = make_search(
        study,
        "search_dm",
        "dm",
        [
            {"backbone": "resnet18", "strength": 1.8},
            {"backbone": "resnet50", "strength": 1.2},
            {"backbone": "googlenet", "strength": 1.5},
        ],
    )
    us = make_search(
        study,
        "search_us",
        "us",
        [{"backbone": "resnet18", "strength": 2.0}, {"backbone": "vgg16", "strength": 1.4}],
    )
    fusion = make_search(
        study,
        "search_fusion",
        "fusion",
        [{"lr": 1e-4, "strength": 2.6}, {"lr": 1e-3, "strength": 1.0, "status": "stopped"}],
    )
    aggregate([dm, us, fusion], study / "aggregate", n_boot=200)

    rows = []
    dev = [(f"p{k}{i:02d}", int(i % 3 == 0)) for k in FOLDS for i in range(N_PER_FOLD)]
    hold = [(f"h{i:03d}", int(i % 3 == 0)) for i in range(N_HOLDOUT)]
    for j, (pid, y) in enumerate(dev + hold):
        label = "malignant" if y else "benign"
        rows.append((pid, "DM", f"img/{pid}_dm.png", label))
        if j % 7:  # a few patients without ultrasound
            rows.append((pid, "US", f"img/{pid}_us.png", label))
    (study / "data").mkdir()
    pd.DataFrame(rows, columns=["patient_id", "modality", "path", "label"]).to_csv(
        study / "data" / "manifest.csv", index=False
    )
    splits = {
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
    (study / "splits.json").write_text(json.dumps(splits))

    rng = np.random.default_rng(11)
    y = np.array([y for _, y in hold])
    preds = []
    models = {"DM only": 1.6, "US only": 1.9, ("DM+US" if not evil else EVIL): 2.8}
    for model, strength in models.items():
        z = strength * (y - 0.5) + rng.normal(0, 1, len(y))
        for pid, yy, s in zip([p for p, _ in hold], y, 1 / (1 + np.exp(-z)), strict=True):
            preds.append((model, pid, yy, s))
    pred_df = pd.DataFrame(preds, columns=["model", "patient_id", "y_true", "y_score"])
    (study / "final").mkdir()
    pred_df.to_csv(study / "final" / "predictions_holdout.csv", index=False)
    oof = pd.read_csv(study / "aggregate" / "oof_best.csv", dtype={"patient_id": str})
    if evil:
        oof["model"] = oof["model"].replace({"DM+US": EVIL})
    result, scores = evaluate_predictions(
        pred_df, n_boot=200, target_sensitivity=0.9, validation=oof
    )
    write_outputs(result, scores, study / "final")
    _png(study / "final" / "gradcam" / "h000_TP_dm.png", 1)
    _png(study / "final" / "gradcam" / "h000_TP_us.png", 2)
    _png(study / "final" / "gradcam" / "h003_FN_dm.png", 3, size=1200)  # gets downscaled
    if evil:
        (study / "final" / "gradcam" / "captions.json").write_text(
            json.dumps({"h000_TP_dm.png": EVIL})
        )
    (study / "study.yaml").write_text(f"name: demo\nnote: '{EVIL if evil else 'ok'}'\n")
    return study


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


def test_full_report(study: Path) -> None:
    inp = discover_inputs(study)
    inp.n_boot = 200
    path = write_report(study, inp)
    assert path == study / "report" / "index.html"
    page = path.read_text()
    c = _check(page)
    assert c.section_ids == [sid for sid, _, _ in SECTIONS]
    assert 'class="missing"' not in page and 'class="problem"' not in page
    # Figures are embedded: ROC (holdout + OOF), 2 confusion, folds, calibration, 3 Grad-CAM.
    assert len(c.images) == 9
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
    assert "paired DeLong" in page
    assert "0.90" in page  # target sensitivity of the operating point
    assert "highest mean patient-level validation AUC" in page  # the rule
    assert "&quot;modality&quot;: &quot;fusion&quot;" in page  # the best config, escaped JSON
    # Cohort: patients without ultrasound are counted.
    assert "have only one modality" in page
    # No script at all: the page is static.
    assert c.scripts == 0


def test_missing_sections_say_not_run(tmp_path: Path) -> None:
    empty = tmp_path / "empty_study"
    empty.mkdir()
    page = write_report(empty).read_text()
    c = _check(page)
    assert c.section_ids == [sid for sid, _, _ in SECTIONS]
    assert page.count('class="missing"') >= len(SECTIONS)
    assert not c.images


def test_partial_study_and_unreadable_file(study: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(study / "data", partial / "data")
    (partial / "splits.json").write_text("{not json")
    page = write_report(partial).read_text()
    _check(page)
    cohort = re.search(r'<section id="cohort">.*?</section>', page, re.S).group(0)
    assert "missing" not in cohort and "malignant" in cohort
    splits = re.search(r'<section id="splits">.*?</section>', page, re.S).group(0)
    assert 'class="problem"' in splits and "splits.json" in splits


def test_searches_aggregated_on_the_fly(study: Path, tmp_path: Path) -> None:
    copy = tmp_path / "no_agg"
    for d in ("search_dm", "search_us", "search_fusion"):
        shutil.copytree(study / d, copy / d)
    inp = discover_inputs(copy)
    assert inp.aggregate is not None and inp.oof_predictions is not None
    assert any("aggregated for this report only" in n for n in inp.notes)
    assert not (copy / "aggregate").exists()  # the report never writes into the study


def test_everything_from_data_is_escaped(tmp_path: Path) -> None:
    study = make_study(tmp_path, evil=True)
    inp = discover_inputs(study)
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
    """The study runner fills ReportInputs itself; sections work from plain data."""
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
        {"model": "m", "patient_id": ["a", "b"], "y_true": [0, 1], "y_score": [0.2, 7.0]}
    )
    page = render_html(ReportInputs(holdout_predictions=preds))
    _check(page)
    roc = re.search(r'<section id="roc">.*?</section>', page, re.S).group(0)
    assert 'class="problem"' in roc and "outside [0, 1]" in roc


def test_command(study: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    res = CliRunner().invoke(report_command, [str(study), "--out", str(out), "--bootstrap", "100"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output
    _check(out.read_text())
    res = CliRunner().invoke(report_command, [str(tmp_path / "missing")])
    assert isinstance(res.exception, UserError) and "no such study folder" in str(res.exception)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_renders_in_headless_chromium(study: Path, tmp_path: Path) -> None:
    page = write_report(study)
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
    assert dom.count('src="data:image/png;base64,') == 9
    assert "Grad-CAM gallery" in dom


def test_aggregate_result_as_input(tmp_path: Path) -> None:
    """The study runner can pass aggregate()'s typed result straight in."""
    searches = _helpers.make_study_searches(tmp_path / "runs")
    res = aggregate(searches, tmp_path / "agg", n_boot=100)
    page = render_html(ReportInputs(aggregate=res, n_boot=100))
    _check(page)
    backbones = re.search(r'<section id="backbones">.*?</section>', page, re.S).group(0)
    assert "ResNet-18" in backbones and 'class="missing"' not in backbones
    assert res.best["trial"] in page
