"""Importers: tiny fake copies of the published layouts (never real data)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastfusion.cli import main
from breastfusion.data.manifest import load_manifest
from breastfusion.errors import UserError
from breastfusion.importers.busi import import_busi
from breastfusion.importers.cbis_ddsm import import_cbis_ddsm
from breastfusion.importers.common import box_of, manifest_path
from breastfusion.importers.folders import import_folders
from breastfusion.importers.mini_mias import import_mini_mias, parse_info

# --------------------------------------------------------------------------------------------
# helpers


def noise(seed: int, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """A random grey image (width, height) = size; distinct seeds never collide."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def mask(size: tuple[int, int], *rects: tuple[int, int, int, int]) -> np.ndarray:
    """A 0/255 mask with half-open rectangles (x0, y0, x1, y1) painted in."""
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    for x0, y0, x1, y1 in rects:
        m[y0:y1, x0:x1] = 255
    return m


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def by(rows: list[dict[str, str]], column: str) -> dict[str, dict[str, str]]:
    return {Path(r[column]).name: r for r in rows}


def box(row: dict[str, str]) -> tuple[int, ...] | None:
    values = [row[f"box_{k}"] for k in ("x0", "y0", "x1", "y1")]
    return None if all(v == "" for v in values) else tuple(int(float(v)) for v in values)


def write_dicom(path: Path, width: int = 24, height: int = 20, seed: int = 0) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    arr = np.random.default_rng(seed).integers(0, 4096, (height, width), dtype=np.uint16)
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------
# common


def test_box_of_is_half_open_and_none_when_empty():
    m = mask((10, 8), (2, 3, 5, 7)) != 0
    assert box_of(m) == (2, 3, 5, 7)
    assert box_of(np.zeros((4, 4), bool)) is None
    assert box_of(np.ones((4, 6), bool)) == (0, 0, 6, 4)


def test_manifest_path_relative_inside_absolute_outside(tmp_path):
    out_dir = tmp_path / "m"
    assert manifest_path(out_dir / "a" / "b c.png", out_dir) == "a/b c.png"
    outside = manifest_path(tmp_path / "x" / ".." / "y.png", out_dir)
    assert Path(outside).is_absolute() and ".." not in outside


# --------------------------------------------------------------------------------------------
# BUSI


@pytest.fixture
def busi(tmp_path) -> Path:
    root = tmp_path / "download" / "Dataset_BUSI_with_GT"
    size = (40, 32)
    b, m, n = root / "benign", root / "malignant", root / "normal"
    save(b / "benign (1).png", noise(1))
    save(b / "benign (1)_mask.png", mask(size, (8, 5, 20, 10)))
    save(b / "benign (2).png", noise(2))  # two lesions -> union of both masks
    save(b / "benign (2)_mask.png", mask(size, (1, 2, 4, 6)))
    save(b / "benign (2)_mask_1.png", mask(size, (30, 20, 35, 31)))
    save(b / "benign (3).png", noise(3))  # empty mask -> kept, no box
    save(b / "benign (3)_mask.png", mask(size))
    save(b / "benign (10).png", noise(1))  # pixel copy of benign (1) -> same patient
    save(b / "benign (10)_mask.png", mask(size, (8, 5, 20, 10)))
    save(b / "benign (99)_mask.png", mask(size, (0, 0, 2, 2)))  # orphan mask
    (b / "Thumbs.db").write_bytes(b"junk")
    save(m / "malignant (1).png", noise(4))
    save(m / "malignant (1)_mask.png", mask(size, (10, 10, 12, 30)))
    save(m / "malignant (2).png", noise(5))  # also in benign/ -> conflicting labels
    save(m / "malignant (2)_mask.png", mask(size, (3, 3, 9, 9)))
    save(b / "benign (4).png", noise(5))
    save(b / "benign (4)_mask.png", mask(size, (3, 3, 9, 9)))
    save(m / "malignant (3).png", noise(6))  # no mask at all
    save(n / "normal (1).png", noise(7))
    save(n / "normal (1)_mask.png", mask(size))
    return root


def test_busi_rows_labels_boxes_and_report(busi, tmp_path):
    out = tmp_path / "out" / "busi.csv"
    report = import_busi(busi.parent, out)  # the folder holding Dataset_BUSI_with_GT works too
    df = load_manifest(out, check_images=True, allow_outside=True)
    rows = by(rows_of(out), "path")
    assert set(rows) == {
        "benign (1).png",
        "benign (2).png",
        "benign (3).png",
        "benign (10).png",
        "malignant (1).png",
        "malignant (3).png",
    }
    assert len(df) == 6 and set(df["modality"]) == {"US"}
    assert rows["benign (1).png"]["label"] == "benign"
    assert rows["malignant (1).png"]["label"] == "malignant"
    assert box(rows["benign (1).png"]) == (8, 5, 20, 10)
    assert box(rows["benign (2).png"]) == (1, 2, 35, 31)  # union of _mask and _mask_1
    assert box(rows["benign (3).png"]) is None
    assert box(rows["malignant (3).png"]) is None
    # each image its own patient, except pixel-identical copies (grouped by default)
    assert rows["benign (10).png"]["patient_id"] == rows["benign (1).png"]["patient_id"]
    assert rows["benign (2).png"]["patient_id"] != rows["benign (3).png"]["patient_id"]
    assert report.written == 6 and report.patients == 5 and report.boxes == 4
    assert report.skipped["normal image (no lesion; excluded by default)"] == 1
    assert report.skipped["exact duplicate with conflicting labels"] == 2
    assert report.skipped["mask without its image"] == 1
    assert report.skipped["not a PNG file"] == 1
    assert report.flagged["empty mask: no box"] == 1
    assert report.flagged["no mask file: no box"] == 1
    assert sorted(map(sorted, report.duplicate_groups)) == [
        ["benign/benign (1).png", "benign/benign (10).png"],
        ["benign/benign (4).png", "malignant/malignant (2).png"],
    ]
    assert report.read == 11 == report.written + report.n_skipped
    text = report.summary()
    assert "exact duplicates: 2 groups" in text and "conflicting labels" in text


def test_busi_normal_kept_as_benign_and_patient_map(busi, tmp_path):
    mapping = tmp_path / "map.csv"
    mapping.write_text("image,patient_id\nbenign (2).png,woman7\nbenign (3),woman7\n")
    out = busi / "manifest.csv"  # inside SOURCE -> relative paths
    report = import_busi(
        busi, out, normal="benign", patient_map=mapping, duplicates="drop", near_duplicates="report"
    )
    rows = by(rows_of(out), "path")
    assert rows["normal (1).png"]["label"] == "benign"
    assert rows["normal (1).png"]["source_class"] == "normal"
    assert box(rows["normal (1).png"]) is None
    assert rows["benign (2).png"]["patient_id"] == rows["benign (3).png"]["patient_id"] == "woman7"
    assert "benign (10).png" not in rows  # drop: first copy kept
    assert report.skipped["exact duplicate (dropped; first copy kept)"] == 1
    assert rows["benign (1).png"]["path"] == "benign/benign (1).png"
    assert any("not in the patient mapping" in w for w in report.warnings)
    df = load_manifest(out, check_images=True)
    assert len(df) == len(rows) == 6


def test_busi_near_duplicates_reported(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    base = noise(11, (64, 64))
    save(root / "benign" / "benign (1).png", base)
    save(root / "benign" / "benign (1)_mask.png", mask((64, 64), (1, 1, 5, 5)))
    brighter = np.clip(base.astype(int) + 3, 0, 255).astype(np.uint8)  # not pixel-identical
    save(root / "malignant" / "malignant (1).png", brighter)
    save(root / "malignant" / "malignant (1)_mask.png", mask((64, 64), (1, 1, 5, 5)))
    report = import_busi(root, tmp_path / "m.csv", near_duplicates="report")
    assert report.duplicate_groups == []
    assert [(p["image_a"], p["image_b"]) for p in report.near_duplicate_pairs] == [
        ("benign/benign (1).png", "malignant/malignant (1).png")
    ]
    assert report.written == 2


def test_busi_wrong_layout_is_a_user_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="does not look like BUSI.*images"):
        import_busi(tmp_path, tmp_path / "m.csv")


# --------------------------------------------------------------------------------------------
# mini-MIAS

INFO = """REFNUM BG CLASS SEVERITY X Y RADIUS
mdb001 G CIRC B 535 425 197
mdb002 G CIRC B 522 280 69
mdb002 G SPIC M 100 900 20
mdb003 D NORM
mdb004 D NORM
mdb005 F CIRC B 477 133 30
mdb005 F CIRC B 500 168 26
mdb006 F CALC M
mdb007 G ARCH M 300 300 10
mdb009 F XXXX B 1 2 3
"""


@pytest.fixture
def mias(tmp_path) -> Path:
    root = tmp_path / "all-mias"
    root.mkdir()
    (root / "Info.txt").write_text(INFO)
    for n in (1, 2, 3, 4, 5, 6, 8):  # mdb007 listed but missing; mdb008 not listed
        Image.fromarray(noise(n, (1024, 1024))).save(root / f"mdb{n:03d}.pgm")
    return root


def test_parse_info_keeps_every_abnormality_line(mias, tmp_path):
    good = tmp_path / "Info.txt"
    good.write_text(INFO.replace("mdb009 F XXXX B 1 2 3\n", ""))
    lines = parse_info(good)
    assert [a.refnum for a in lines].count("mdb005") == 2
    assert lines[0].x == 535 and lines[0].y == 425 and lines[0].radius == 197
    assert lines[3].cls == "NORM" and lines[3].severity is None
    assert not [a for a in lines if a.refnum == "mdb006"][0].has_coordinates
    with pytest.raises(UserError, match="line 11: unknown class 'XXXX'"):
        parse_info(mias / "Info.txt")


def test_mini_mias_rows_boxes_origin_pairs(mias, tmp_path):
    out = tmp_path / "mias.csv"
    report = import_mini_mias(mias, out)
    df = load_manifest(out, check_images=True, allow_outside=True)
    rows = by(rows_of(out), "path")
    assert set(rows) == {"mdb001.pgm", "mdb002.pgm", "mdb005.pgm", "mdb006.pgm"}
    assert set(df["modality"]) == {"DM"}
    # origin is bottom-left: centre row = 1024 - y
    assert box(rows["mdb001.pgm"]) == (535 - 197, 1024 - 425 - 197, 535 + 197, 1024 - 425 + 197)
    # benign + malignant on one film: malignant, boxed around the malignant lesion only
    assert rows["mdb002.pgm"]["label"] == "malignant"
    assert box(rows["mdb002.pgm"]) == (80, 104, 120, 144)
    assert box(rows["mdb005.pgm"]) == (447, 830, 526, 921)  # union of two lesions
    assert rows["mdb006.pgm"]["label"] == "malignant" and box(rows["mdb006.pgm"]) is None
    # one woman per film pair, odd = right, even = left
    assert rows["mdb001.pgm"]["patient_id"] == rows["mdb002.pgm"]["patient_id"] == "mias_001-002"
    assert rows["mdb005.pgm"]["patient_id"] == rows["mdb006.pgm"]["patient_id"] == "mias_005-006"
    assert rows["mdb001.pgm"]["laterality"] == "R" and rows["mdb002.pgm"]["laterality"] == "L"
    # one label per patient (manifest contract): the benign film of a malignant pair follows
    assert rows["mdb001.pgm"]["label"] == "malignant"
    assert rows["mdb001.pgm"]["image_label"] == "benign"
    assert rows["mdb005.pgm"]["image_label"] == "benign"
    assert report.skipped["NORM film (no severity; excluded by default)"] == 2
    assert report.skipped["listed in Info.txt but no image file"] == 1
    assert report.skipped["image not listed in Info.txt"] == 1
    assert report.skipped["malformed Info.txt line"] == 1
    assert report.flagged["abnormality without coordinates: no box"] == 1
    assert any("benign and malignant" in w for w in report.warnings)
    assert report.patients == 2
    assert report.read == 9 == report.written + report.n_skipped


def test_mini_mias_norm_kept_and_png_conversion(mias, tmp_path):
    from breastfusion.data.imaging import read_grey

    out = tmp_path / "m" / "mias.csv"
    report = import_mini_mias(mias, out, normal="benign", convert_png=True)
    rows = by(rows_of(out), "path")
    assert rows["mdb003.png"]["label"] == "benign" and box(rows["mdb003.png"]) is None
    assert rows["mdb003.png"]["path"] == "mini-mias-png/mdb003.png"
    np.testing.assert_array_equal(
        read_grey(out.parent / "mini-mias-png" / "mdb001.png"), read_grey(mias / "mdb001.pgm")
    )
    assert report.written == 6
    load_manifest(out, check_images=True)


def test_mini_mias_pgm_is_readable_by_the_project_reader(mias):
    from breastfusion.data.imaging import image_size, read_grey

    assert image_size(mias / "mdb001.pgm") == (1024, 1024)
    assert read_grey(mias / "mdb001.pgm").shape == (1024, 1024)


def test_mini_mias_without_info_is_a_user_error(tmp_path):
    Image.fromarray(noise(1)).save(tmp_path / "mdb001.pgm")
    with pytest.raises(UserError, match="no Info.txt"):
        import_mini_mias(tmp_path, tmp_path / "m.csv")


# --------------------------------------------------------------------------------------------
# CBIS-DDSM

MASS_HEADER = (
    "patient_id,breast_density,left or right breast,image view,abnormality id,"
    "abnormality type,mass shape,mass margins,assessment,pathology,subtlety,"
    "image file path,cropped image file path,ROI mask file path"
)
CALC_HEADER = (
    "patient_id,breast density,left or right breast,image view,abnormality id,"
    "abnormality type,calc type,calc distribution,assessment,pathology,subtlety,"
    "image file path,cropped image file path,ROI mask file path"
)
UID1 = "1.3.6.1.4.1.9590.100.1.2.4221"
UID2 = "1.3.6.1.4.1.9590.100.1.2.3423"


def _cbis_row(pid, side, view, n, kind, pathology, folder):
    extra = "OVAL,CIRCUMSCRIBED" if kind == "mass" else "AMORPHOUS,CLUSTERED"
    return (
        f"{pid},3,{side},{view},{n},{kind},{extra},4,{pathology},4,"
        f"{folder}/{UID1}/{UID2}/000000.dcm,"
        f"{folder}_{n}/{UID1}/{UID2}/000000.dcm,"
        f'"{folder}_{n}/{UID1}/{UID2}/000001.dcm\n"'
    )


@pytest.fixture
def cbis(tmp_path) -> Path:
    src = tmp_path / "cbis"
    csvs = src / "csv"
    csvs.mkdir(parents=True)
    (csvs / "mass_case_description_train_set.csv").write_text(
        "\n".join(
            [
                MASS_HEADER,
                _cbis_row(
                    "P_00001", "LEFT", "CC", 1, "mass", "BENIGN", "Mass-Training_P_00001_LEFT_CC"
                ),
                _cbis_row(
                    "P_00001", "LEFT", "CC", 2, "mass", "MALIGNANT", "Mass-Training_P_00001_LEFT_CC"
                ),
                _cbis_row(
                    "P_00001",
                    "LEFT",
                    "MLO",
                    1,
                    "mass",
                    "BENIGN_WITHOUT_CALLBACK",
                    "Mass-Training_P_00001_LEFT_MLO",
                ),
            ]
        )
        + "\n"
    )
    (csvs / "mass_case_description_test_set.csv").write_text(
        MASS_HEADER
        + "\n"
        + _cbis_row("P_00002", "RIGHT", "CC", 1, "mass", "MALIGNANT", "Mass-Test_P_00002_RIGHT_CC")
        + "\n"
    )
    (csvs / "calc_case_description_train_set.csv").write_text(
        "\n".join(
            [
                CALC_HEADER,
                _cbis_row(
                    "P_00003",
                    "LEFT",
                    "CC",
                    1,
                    "calcification",
                    "BENIGN",
                    "Calc-Training_P_00003_LEFT_CC",
                ),
                _cbis_row(
                    "P_00004",
                    "RIGHT",
                    "MLO",
                    1,
                    "calcification",
                    "UNPROVEN",
                    "Calc-Training_P_00004_RIGHT_MLO",
                ),
            ]
        )
        + "\n"
    )
    (csvs / "calc_case_description_test_set.csv").write_text(
        CALC_HEADER
        + "\n"
        + _cbis_row(
            "P_00001", "LEFT", "CC", 1, "calcification", "BENIGN", "Calc-Test_P_00001_LEFT_CC"
        )
        + "\n"
    )
    img = src / "CBIS-DDSM"
    # TCIA download layout: only the leading folder matches the CSV path
    write_dicom(
        img
        / "Mass-Training_P_00001_LEFT_CC"
        / "07-20-2016-DDSM-74994"
        / "1.000000-full mammogram images-24515"
        / "1-1.dcm",
        seed=1,
    )
    write_dicom(
        img
        / "Mass-Training_P_00001_LEFT_MLO"
        / "07-20-2016-DDSM-90884"
        / "1.000000-full mammogram images-80344"
        / "1-1.dcm",
        seed=2,
    )
    # older layout: the CSV path exactly
    write_dicom(img / "Mass-Test_P_00002_RIGHT_CC" / UID1 / UID2 / "000000.dcm", seed=3)
    # Calc-Training_P_00003_LEFT_CC is missing -> unresolved
    return src


def test_cbis_ddsm_rows_dedupe_conflicts_and_unresolved(cbis, tmp_path):
    out = tmp_path / "cbis.csv"
    report = import_cbis_ddsm(cbis, out)
    df = load_manifest(out, check_images=True, allow_outside=True)
    rows = {(r["patient_id"], r["laterality"], r["view"]): r for r in rows_of(out)}
    assert set(rows) == {("P_00001", "L", "CC"), ("P_00001", "L", "MLO"), ("P_00002", "R", "CC")}
    assert len(df) == 3 and set(df["modality"]) == {"DM"}
    cc = rows[("P_00001", "L", "CC")]
    assert cc["label"] == "malignant"  # BENIGN + MALIGNANT on one image: malignant wins
    assert cc["source_split"] == "train+test"  # mass-train and calc-test copies merged
    assert cc["abnormality_type"] == "calc+mass" and cc["abnormalities"] == "3"
    assert cc["path"].endswith("1.000000-full mammogram images-24515/1-1.dcm")
    # one label per patient: her benign MLO image takes the patient's malignant label
    mlo = rows[("P_00001", "L", "MLO")]
    assert mlo["label"] == "malignant" and mlo["image_label"] == "benign"
    assert report.flagged["relabelled malignant: the patient has a malignant image"] == 1
    assert rows[("P_00002", "R", "CC")]["source_split"] == "test"
    assert rows[("P_00002", "R", "CC")]["path"].endswith(f"{UID2}/000000.dcm")
    assert report.skipped["unresolved image path: image folder not found"] == 1
    assert report.skipped["unknown pathology 'UNPROVEN'"] == 1
    assert report.skipped_items["unresolved image path: image folder not found"] == [
        "Calc-Training_P_00003_LEFT_CC"
    ]
    assert any("benign and malignant" in w for w in report.warnings)
    assert any("both the train and the test" in w and "P_00001" in w for w in report.warnings)
    assert report.written == 3 and report.patients == 2
    assert report.read == 5 == report.written + report.n_skipped


def test_cbis_ddsm_no_merge_and_mass_only(cbis, tmp_path):
    out = tmp_path / "mass.csv"
    report = import_cbis_ddsm(cbis, out, abnormality="mass", images=cbis / "CBIS-DDSM")
    rows = rows_of(out)
    assert len(rows) == 3 and all(r["abnormality_type"] == "mass" for r in rows)
    assert not report.skipped
    out2 = tmp_path / "nomerge.csv"
    report2 = import_cbis_ddsm(cbis, out2, merge_views=False)
    # the calc-test copy of P_00001 LEFT CC has no folder of its own on disk
    assert report2.skipped["unresolved image path: image folder not found"] == 2


def test_cbis_ddsm_missing_csvs_and_columns(tmp_path):
    with pytest.raises(UserError, match="none of the description CSVs"):
        import_cbis_ddsm(tmp_path, tmp_path / "m.csv")
    (tmp_path / "mass_case_description_train_set.csv").write_text(
        "patient_id,pathology\nP_1,BENIGN\n"
    )
    with pytest.raises(UserError, match="lacks column.*'left or right breast'"):
        import_cbis_ddsm(tmp_path, tmp_path / "m.csv")


def test_cbis_ddsm_ambiguous_folder_is_reported(cbis, tmp_path):
    folder = cbis / "CBIS-DDSM" / "Mass-Training_P_00001_LEFT_MLO" / "07-20-2016-DDSM-90884"
    write_dicom(folder / "2.000000-other-1" / "1-1.dcm", seed=9)
    shutil.rmtree(folder / "1.000000-full mammogram images-80344")
    write_dicom(folder / "3.000000-other-2" / "1-1.dcm", seed=8)
    report = import_cbis_ddsm(cbis, tmp_path / "m.csv")
    assert report.skipped["unresolved image path: several DICOMs in the image folder"] == 1


# --------------------------------------------------------------------------------------------
# folders


@pytest.fixture
def folders(tmp_path) -> Path:
    root = tmp_path / "data"
    size = (40, 32)
    save(root / "benign" / "a.png", noise(21))
    save(root / "benign" / "a_mask.png", mask(size, (4, 4, 8, 9)))
    save(root / "benign" / "a_mask_1.png", mask(size, (20, 2, 22, 3)))
    save(root / "benign" / "e.png", noise(25))
    save(root / "Malignant" / "b.png", noise(22))
    save(root / "Malignant" / "b_mask.png", mask(size))
    save(root / "Malignant" / "sub" / "c.jpg", noise(23))
    save(root / "Malignant" / "d.tif", noise(25))  # same pixels as benign/e.png
    write_dicom(root / "benign" / "f.dcm", seed=4)
    save(root / "normal" / "x.png", noise(24))
    (root / "benign" / "notes.txt").write_text("hello")
    return root


def test_folders_rows_masks_modality_and_skips(folders, tmp_path):
    out = tmp_path / "f.csv"
    report = import_folders(folders, out, modality="us", mask_suffix="_mask")
    df = load_manifest(out, check_images=True, allow_outside=True)
    rows = by(rows_of(out), "path")
    assert set(rows) == {"a.png", "b.png", "c.jpg", "f.dcm"}
    assert set(df["modality"]) == {"US"}
    assert rows["a.png"]["label"] == "benign" and rows["c.jpg"]["label"] == "malignant"
    assert box(rows["a.png"]) == (4, 2, 22, 9)
    assert box(rows["b.png"]) is None and box(rows["f.dcm"]) is None
    assert rows["c.jpg"]["patient_id"] == "c"
    assert report.skipped["folder 'normal' is not a label (benign|malignant)"] == 1
    assert report.skipped["unsupported file type '.txt'"] == 1
    assert report.skipped["exact duplicate with conflicting labels"] == 2
    assert report.flagged["empty mask: no box"] == 1
    assert report.flagged["no mask file: no box"] == 4  # c, d, e, f (d/e dropped later)
    assert report.read == 8 == report.written + report.n_skipped


def test_folders_patient_map_and_no_masks(folders, tmp_path):
    mapping = tmp_path / "map.csv"
    mapping.write_text("image,patient_id\nbenign/a.png,p1\nc.jpg,p1\n")
    out = folders / "manifest.csv"
    report = import_folders(folders, out, modality="DM", patient_map=mapping, duplicates="warn")
    rows = by(rows_of(out), "path")
    assert rows["a.png"]["patient_id"] == rows["c.jpg"]["patient_id"] == "p1"
    assert "a_mask.png" in rows  # without --mask-suffix a mask is just an image
    assert "d.tif" in rows and "e.png" in rows  # warn keeps the conflicting copies
    assert report.duplicate_groups
    assert rows["c.jpg"]["path"] == "Malignant/sub/c.jpg"


def test_folders_wrong_layout(tmp_path):
    save(tmp_path / "img.png", noise(1))
    with pytest.raises(UserError, match="no benign/ or malignant/ folder"):
        import_folders(tmp_path, tmp_path / "m.csv", modality="US")


# --------------------------------------------------------------------------------------------
# command line


def test_cli_import_prints_report_and_writes_json(busi, tmp_path, capsys):
    out = tmp_path / "busi.csv"
    rj = tmp_path / "report.json"
    code = main(["import", "busi", str(busi), "--out", str(out), "--report-json", str(rj)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "busi: read 11, wrote 6 rows" in captured.out
    assert "normal image (no lesion; excluded by default)" in captured.out
    data = json.loads(rj.read_text())
    assert data["written"] == 6 and data["skipped"]["mask without its image"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["import", "busi", "{missing}", "--out", "{out}"], "does not exist"),
        (["import", "busi", "{empty}", "--out", "{out}"], "does not look like BUSI"),
        (["import", "mini-mias", "{empty}", "--out", "{out}"], "no Info.txt"),
        (["import", "cbis-ddsm", "{empty}", "--out", "{out}"], "none of the description CSVs"),
        (["import", "folders", "{empty}", "--out", "{out}"], "--modality DM|US is required"),
        (
            ["import", "mini-mias", "{empty}", "--out", "{out}", "--modality", "US"],
            "--modality do not apply to format mini-mias",
        ),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(tmp_path, capsys, argv, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    subs = {"missing": tmp_path / "nope", "empty": empty, "out": tmp_path / "m.csv"}
    code = main([a.format(**subs) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.csv").exists()


def test_mask_of_another_size_gives_no_box_and_bad_mapping_is_named(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    save(root / "benign" / "benign (1).png", noise(1, (40, 32)))
    save(root / "benign" / "benign (1)_mask.png", mask((20, 16), (1, 1, 5, 5)))
    save(root / "malignant" / "malignant (1).png", noise(2, (40, 32)))
    save(root / "malignant" / "malignant (1)_mask.png", mask((40, 32), (1, 1, 5, 5)))
    report = import_busi(root, tmp_path / "m.csv")
    assert report.flagged["mask size differs from the image: no box"] == 1
    assert report.boxes == 1
    bad = tmp_path / "map.csv"
    bad.write_text("file,patient\nbenign (1).png,p1\n")
    with pytest.raises(UserError, match=r"map\.csv: a patient mapping needs the columns"):
        import_busi(root, tmp_path / "m.csv", patient_map=bad)
    bad.write_text("image,patient_id\nbenign (1).png,p1\nbenign (1).png,p2\n")
    with pytest.raises(UserError, match="invalid patient mapping") as exc:
        import_busi(root, tmp_path / "m.csv", patient_map=bad)
    assert "line 3" in str(exc.value)


def test_non_utf8_csv_inputs_are_user_errors(tmp_path):
    from breastfusion.importers import cbis_ddsm
    from breastfusion.importers.common import ImportReport, load_patient_map

    mapping = tmp_path / "map.csv"
    mapping.write_bytes("image,patient_id\nJos\xe9.png,1\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"map\.csv: the patient mapping is not UTF-8"):
        load_patient_map(mapping)
    desc = tmp_path / "mass_case_description_train_set.csv"
    desc.write_bytes("patient_id,pathology\nJos\xe9,MALIGNANT\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"mass_case_description_train_set\.csv is not UTF-8"):
        cbis_ddsm._read_csv(desc, "mass", "train", {}, ImportReport("cbis-ddsm", str(tmp_path)))


# --------------------------------------------------------------------------------------------
# bad outputs: refused before anything is written


def test_cli_import_refuses_unwritable_outputs_before_writing(busi, tmp_path, capsys):
    folder = tmp_path / "a folder"
    folder.mkdir()
    code = main(["import", "busi", str(busi), "--out", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: cannot write {folder}: it is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a folder", "download"]
    out = tmp_path / "m" / "busi.csv"
    code = main(["import", "busi", str(busi), "--out", str(out), "--report-json", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and str(folder) in err and "Traceback" not in err
    assert not out.parent.exists()  # the manifest is not written when its report cannot be


def test_mini_mias_png_copies_never_replace_a_foreign_folder(mias, tmp_path, capsys):
    out = tmp_path / "o" / "mias.csv"
    foreign = out.parent / "mini-mias-png"
    foreign.mkdir(parents=True)
    (foreign / "precious.png").write_bytes(b"mine")
    code = main(["import", "mini-mias", str(mias), "--out", str(out), "--convert-png"])
    err = capsys.readouterr().err
    assert code == 2 and f"refusing to replace {foreign}" in err and "Traceback" not in err
    assert sorted(p.name for p in foreign.iterdir()) == ["precious.png"] and not out.exists()


def test_mini_mias_png_conversion_skips_truncated_film_and_reruns(mias, tmp_path):
    data = (mias / "mdb005.pgm").read_bytes()
    (mias / "mdb005.pgm").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    out = tmp_path / "m" / "mias.csv"
    report = import_mini_mias(mias, out, convert_png=True)
    assert report.skipped["unreadable image"] == 1
    assert report.read == report.written + report.n_skipped
    pngs = sorted(p.name for p in (out.parent / "mini-mias-png").glob("*.png"))
    assert pngs == ["mdb001.png", "mdb002.png", "mdb006.png"]
    again = import_mini_mias(mias, out, convert_png=True)  # its own folder: replaced
    assert again.written == report.written
    load_manifest(out, check_images=True)
