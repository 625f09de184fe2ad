"""ROI quality surfaced (summary, crops.csv, warning), the shared crop rule, relocatable
outputs and the detector bundle's validation, all with fake detectors (no ultralytics)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from breastfusion.errors import UserError
from breastfusion.roi.crop import crop_manifest, save_png
from breastfusion.roi.geometry import Detection, box_iou, crop_image, detector_image
from breastfusion.roi.settings import CropSettings, DetectorTrainSettings
from test_roi import FakeDetector, frame, write_cohort


@pytest.fixture()
def cohort(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    manifest = write_cohort(tmp_path / "study" / "cohort")
    return manifest, frame(manifest)


class BoxDetector:
    """Returns each image's manifest box shifted right by ``shift`` px, with a known
    confidence; finds nothing in images listed in ``blind`` (by shape and order)."""

    def __init__(self, df: pd.DataFrame, shift: float = 0.0, miss_every: int = 0) -> None:
        us = df[df["modality"] == "US"].sort_values("row")
        self.boxes = [tuple(r[["box_x0", "box_y0", "box_x1", "box_y1"]]) for _, r in us.iterrows()]
        self.shift, self.miss_every, self.calls = shift, miss_every, 0

    def __call__(self, images):
        out = []
        for _ in images:
            k = self.calls
            self.calls += 1
            if self.miss_every and k % self.miss_every == 0:
                out.append(None)
                continue
            x0, y0, x1, y1 = self.boxes[k]
            s = self.shift
            out.append(Detection(x0 + s + 0.123456789, y0, x1 + s + 0.123456789, y1, 0.5 + k / 1e9))
        return out


def test_summary_counts_confidence_and_iou(cohort, tmp_path) -> None:
    _, df = cohort
    det = BoxDetector(df, shift=0.0)
    result = crop_manifest(df, tmp_path / "out", det, holdout=["P000", "P001"])
    s = result.summary
    assert s.counts == {"detected": 16, "box": 0, "fallback": 0, "dropped": 0}
    assert s.n_us == 16 and s.fallback_share == 0.0 and s.warnings == []
    assert s.mean_confidence == pytest.approx(0.5 + np.mean(range(16)) / 1e9, abs=1e-15)
    # Boxes shifted by 0.123456789 px: IoU just below 1, every detection >= 0.5.
    assert s.iou.n == 16 and 0.98 < s.iou.mean < 1 and s.iou.share_ge_050 == 1.0
    assert s.iou.missed == 0 and s.iou_holdout.n == 4
    on_disk = json.loads((tmp_path / "out" / "roi_summary.json").read_text())
    assert on_disk["iou_vs_manifest_boxes"]["mean"] == s.iou.mean  # full precision
    assert on_disk["counts"] == s.counts and on_disk["settings"] == CropSettings().to_dict()
    assert on_disk["warnings"] == [] and on_disk["iou_vs_manifest_boxes_holdout"]["n"] == 4


def test_high_fallback_share_is_warned(cohort, tmp_path, caplog) -> None:
    _, df = cohort
    det = BoxDetector(df, shift=40.0, miss_every=2)  # half missed, the rest far off
    with caplog.at_level(logging.WARNING, logger="breastfusion.roi.crop"):
        result = crop_manifest(df, tmp_path / "out", det)
    s = result.summary
    assert s.counts["fallback"] == 8 and s.counts["detected"] == 8
    assert s.fallback_share == 0.5
    assert len(s.warnings) == 1 and "8 of 16 US images (50%" in s.warnings[0]
    assert "roi.crop.conf" in s.warnings[0] and s.warnings[0] in caplog.text
    assert s.iou.missed == 8 and s.iou.share_ge_050 < 1
    on_disk = json.loads((tmp_path / "out" / "roi_summary.json").read_text())
    assert on_disk["warnings"] == s.warnings and on_disk["fallback_share"] == 0.5
    # The CLI lines say it too.
    assert any("no-detection share 50.0%" in line for line in s.lines())
    # At or below 20% there is no warning.
    quiet = crop_manifest(df, tmp_path / "out2", BoxDetector(df, miss_every=5))
    assert quiet.summary.fallback_share == pytest.approx(4 / 16) and quiet.summary.warnings
    calm = crop_manifest(df, tmp_path / "out3", BoxDetector(df, miss_every=8))
    assert calm.summary.fallback_share == pytest.approx(2 / 16) and calm.summary.warnings == []


def test_crops_csv_records_raw_detections_at_full_precision(cohort, tmp_path) -> None:
    _, df = cohort
    det = BoxDetector(df, shift=3.0, miss_every=4)
    crop_manifest(df, tmp_path / "out", det, margin=0.25, fallback="drop")
    table = pd.read_csv(tmp_path / "out" / "crops.csv")
    us = df[df["modality"] == "US"].set_index("row")
    assert list(table["row"]) == sorted(us.index)
    detected = table[table["roi_source"] == "detected"]
    dropped = table[table["roi_source"] == "dropped"]
    assert len(detected) == 12 and len(dropped) == 4
    assert dropped["path"].isna().all() and dropped["det_x0"].isna().all()
    for _, r in detected.iterrows():
        box = us.loc[r["row"], ["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy(float)
        assert r["det_x0"] == box[0] + 3.123456789  # raw, source pixels, unrounded
        assert r["det_x1"] == box[2] + 3.123456789 and r["det_y0"] == box[1]
        assert r["box_x0"] == box[0]  # the manifest box, in source pixels
        assert r["confidence"] > 0.5 and str(r["confidence"]) != "0.5"
        assert r["iou"] == pytest.approx(box_iou((r["det_x0"], r["det_y0"], r["det_x1"],
                                                  r["det_y1"]), box))  # fmt: skip
        assert r["roi_x0"] <= r["det_x0"] and r["roi_x1"] >= r["det_x1"]
        assert (tmp_path / "out" / r["source_path"]).resolve() == Path(
            us.loc[r["row"], "abs_path"]
        ).resolve()
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    mus = manifest[manifest["modality"] == "US"].set_index("path")
    assert len(mus) == 12
    for _, r in detected.iterrows():
        assert mus.at[r["path"], "roi_confidence"] == r["confidence"]


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    mode = "I;16" if array.dtype == np.uint16 else "L"
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("use_boxes", [False, True])
def test_crop_image_reproduces_the_written_crops(cohort, tmp_path, use_boxes) -> None:
    """predict's path (read, detector_image, detector, crop_image) gives the same pixels and
    the same PNG bytes as the files crop_manifest wrote."""
    from breastfusion.data.imaging import read_grey

    _, df = cohort
    settings = CropSettings(margin=0.137, fallback="centre", centre_fraction=0.55)
    out = tmp_path / "out"
    crop_manifest(df, out, FakeDetector(), settings, use_boxes=use_boxes)
    table = pd.read_csv(out / "crops.csv")
    sources = set()
    for _, r in table.iterrows():
        src = df[df["row"] == r["row"]].iloc[0]
        raw = read_grey(src["abs_path"])
        if use_boxes:
            roi = tuple(float(src[c]) for c in ("box_x0", "box_y0", "box_x1", "box_y1"))
        else:
            roi = FakeDetector()([detector_image(raw)])[0]
        array, info = crop_image(raw, roi, settings)
        written = np.asarray(Image.open(out / r["path"]))
        assert array.dtype == written.dtype and np.array_equal(array, written)
        tmp_file = tmp_path / "again.png"
        save_png(array, tmp_file)
        assert tmp_file.read_bytes() == (out / r["path"]).read_bytes()
        assert info["roi_source"] == r["roi_source"]
        assert tuple(info["window"]) == tuple(r[["roi_x0", "roi_y0", "roi_x1", "roi_y1"]])
        sources.add(info["roi_source"])
    assert sources == ({"box"} if use_boxes else {"detected", "fallback"})
    assert _png_bytes(np.zeros((2, 2), np.uint8))  # helper sanity


def test_crop_image_rules() -> None:
    raw = np.arange(100 * 80, dtype=np.float32).reshape(80, 100) % 251
    s = CropSettings(margin=0.1, fallback="centre", centre_fraction=0.5)
    array, info = crop_image(raw, Detection(20, 10, 40, 30, 0.7), s)
    assert info == {"roi_source": "detected", "window": (18, 8, 42, 32),
                    "det_box": (20.0, 10.0, 40.0, 30.0), "confidence": 0.7}  # fmt: skip
    assert array.dtype == np.uint8 and np.array_equal(array, raw[8:32, 18:42])
    array, info = crop_image(raw, None, s)
    assert info["roi_source"] == "fallback" and info["window"] == (25, 20, 75, 60)
    array, info = crop_image(raw, None, s.replace(fallback="whole"))
    assert info["window"] == (0, 0, 100, 80) and array.shape == (80, 100)
    array, info = crop_image(raw, None, s.replace(fallback="drop"))
    assert array is None and info["roi_source"] == "dropped"
    array, info = crop_image(raw, (20, 10, 40, 30), s.replace(margin=0))
    assert info["roi_source"] == "box" and info["confidence"] is None
    assert array.shape == (20, 20)
    with pytest.raises(ValueError, match="2-D"):
        crop_image(np.zeros((4, 4, 3)), None, s)


def test_outputs_survive_moving_the_study_folder(cohort, tmp_path) -> None:
    manifest, df = cohort
    study = manifest.parent.parent
    det = BoxDetector(df, miss_every=3)
    result = crop_manifest(
        df,
        study / "roi" / "crops",
        det,
        source_manifest=manifest,
        weights=study / "roi" / "w.pt",
        extra_summary={"note": "x"},
    )
    root = str(tmp_path)
    for name in ("manifest.csv", "crops.csv", "roi_summary.json"):
        text = (result.manifest.parent / name).read_text()
        assert root not in text, f"{name} stores an absolute path"
    summary = json.loads(result.summary_json.read_text())
    assert summary["provenance"]["source_manifest"] == "../../cohort/manifest.csv"
    assert summary["provenance"]["weights"] == "../w.pt"
    moved = tmp_path / "moved"
    shutil.move(str(study), moved)
    from breastfusion.data.manifest import load_manifest

    again = load_manifest(moved / "roi" / "crops" / "manifest.csv", check_images=True)
    assert len(again) == len(df)
    for p in again["abs_path"]:
        assert Path(p).is_file() and str(moved) in p
    table = pd.read_csv(moved / "roi" / "crops" / "crops.csv")
    for p in table["source_path"]:
        assert (moved / "roi" / "crops" / p).is_file()
    assert (moved / "roi" / "crops" / summary["provenance"]["source_manifest"]).is_file()


def test_unlinkable_dm_images_are_copied_so_the_folder_stays_relocatable(
    cohort, tmp_path, monkeypatch
) -> None:
    _, df = cohort

    def refuse(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    result = crop_manifest(df, tmp_path / "out", None, use_boxes=True)
    new = pd.read_csv(result.manifest)
    dm = new[new["modality"] == "DM"]["path"]
    assert not any(os.path.isabs(p) for p in dm)
    folder = Path(result.manifest).parent
    assert all((folder / p).is_file() and not (folder / p).is_symlink() for p in dm)
    assert any("copied instead" in w for w in result.summary.warnings)


def test_dm_images_neither_linkable_nor_copyable_keep_absolute_paths_and_warn(
    cohort, tmp_path, monkeypatch
) -> None:
    import shutil

    _, df = cohort

    def refuse(*args, **kwargs):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(shutil, "copy2", refuse)
    result = crop_manifest(df, tmp_path / "out", None, use_boxes=True)
    new = pd.read_csv(result.manifest)
    assert all(os.path.isabs(p) for p in new[new["modality"] == "DM"]["path"])
    assert any("not relocatable" in w for w in result.summary.warnings)


# ------------------------------------------------------------------------- bundle (light)


def _bundle(tmp_path: Path) -> Path:
    from breastfusion.roi.bundle import export_detector

    weights = tmp_path / "best.pt"
    weights.write_bytes(b"not really weights")
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "other.txt").write_text("someone else's export")
    export_detector(
        dest,
        weights,
        DetectorTrainSettings(imgsz=96, epochs=5),
        CropSettings(margin=0.1234567890123, fallback="whole"),
        {"mAP50": 0.81234567, "mAP50-95": 0.5, "precision": None, "recall": 0.7},
    )
    return dest


def test_export_detector_writes_a_described_bundle(tmp_path) -> None:
    from breastfusion.roi.bundle import read_bundle

    dest = _bundle(tmp_path)
    assert sorted(p.name for p in dest.iterdir()) == ["detector.json", "detector.pt", "other.txt"]
    record = json.loads((dest / "detector.json").read_text())
    assert record["format"] == "breastfusion-detector" and record["format_version"] == 1
    assert record["crop"]["margin"] == 0.1234567890123 and record["imgsz"] == 96
    assert record["metrics"]["mAP50"] == 0.81234567 and record["class_name"] == "lesion"
    assert "whole image" in record["fallback_rule"] and record["ultralytics_version"]
    assert (dest / "detector.pt").read_bytes() == b"not really weights"
    meta, crop = read_bundle(dest)
    assert crop == CropSettings(margin=0.1234567890123, fallback="whole")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: (d / "detector.json").unlink(), r"detector\.json: not found; .* is not a detector bundle"),
        (lambda d: (d / "detector.json").write_text("{"), r"detector\.json: not a readable"),
        (lambda d: _edit(d, format="other"), r"detector\.json: not a detector bundle"),
        (lambda d: _edit(d, format_version=2), r"detector\.json: format_version 2 is newer"),
        (lambda d: _edit(d, crop={"margin": -1}), r"detector\.json: crop\.margin must be >= 0"),
        (lambda d: _edit(d, weights="../best.pt"), r"weights must name a file inside"),
        (lambda d: (d / "detector.pt").write_bytes(b"x"), r"detector\.pt: checksum does not match"),
        (lambda d: (d / "detector.pt").unlink(), r"detector\.pt: detector weights named by"),
    ],
)  # fmt: skip
def test_load_detector_refuses_what_is_not_a_bundle(tmp_path, change, message) -> None:
    from breastfusion.roi.bundle import load_detector

    dest = _bundle(tmp_path)
    change(dest)
    with pytest.raises(UserError, match=message):
        load_detector(dest)
    with pytest.raises(UserError, match="no such detector bundle folder"):
        load_detector(tmp_path / "nowhere")


def _edit(dest: Path, **changes) -> None:
    record = json.loads((dest / "detector.json").read_text())
    record.update(changes)
    (dest / "detector.json").write_text(json.dumps(record))
