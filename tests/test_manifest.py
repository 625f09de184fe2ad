"""Manifest validation: every problem is found, named by row/column/patient/file, and listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from breastfusion.cli import main
from breastfusion.data import manifest as manifest_mod
from breastfusion.data.manifest import load_manifest, summarize, validate_manifest
from breastfusion.errors import ManifestError

HEADER = "patient_id,modality,path,label"
BOX_HEADER = HEADER + ",box_x0,box_y0,box_x1,box_y1"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Six distinct 30x20 (width x height) grey PNGs and a constant one."""
    rng = np.random.default_rng(0)
    for name in "abcdef":
        Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(
            tmp_path / f"{name}.png"
        )
    Image.fromarray(np.full((20, 30), 9, dtype=np.uint8)).save(tmp_path / "flat.png")
    return tmp_path


def write(folder: Path, *lines: str, name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def problems(path: Path, **kwargs) -> list[str]:
    """The ManifestError details load_manifest raises (fails the test if none is raised)."""
    with pytest.raises(ManifestError) as err:
        load_manifest(path, **kwargs)
    assert str(path) in err.value.message
    return err.value.details


def only(details: list[str], text: str) -> str:
    hits = [d for d in details if text in d]
    assert len(hits) == 1, (text, details)
    return hits[0]


VALID = (
    BOX_HEADER + ",roi_source",
    "007,dm,a.png, Benign ,,,,,manual",
    "007, US ,b.png,benign,1,2,10,12,",
    "8,DM,c.png,malignant,,,,,",
    "8,US,d.png,malignant,0,0,30,20,yolo",
)


# --- a valid manifest -------------------------------------------------------------------------


def test_valid_manifest_normalised_frame(folder):
    df = load_manifest(write(folder, *VALID))
    assert list(df["patient_id"]) == ["007", "007", "8", "8"]  # str, zeros kept
    assert list(df["modality"]) == ["DM", "US", "DM", "US"]
    assert list(df["label"]) == ["benign", "benign", "malignant", "malignant"]
    assert list(df["y"]) == [0, 0, 1, 1]
    assert list(df["row"]) == [2, 3, 4, 5]
    assert df.loc[0, "abs_path"] == str(folder / "a.png")
    assert list(df["roi_source"]) == ["manual", "", "", "yolo"]  # extra column kept
    assert df.loc[1, ["box_x0", "box_y0", "box_x1", "box_y1"]].tolist() == [1, 2, 10, 12]
    assert np.isnan(df.loc[0, "box_x0"])
    for col in ("view", "laterality"):
        assert col in df.columns


def test_row_numbers_are_csv_lines(folder):
    df = load_manifest(write(folder, HEADER, "p1,DM,a.png,benign", "", "p1,US,b.png,benign"))
    assert list(df["row"]) == [2, 4]


def test_saved_frame_reloads(folder):
    df = load_manifest(write(folder, *VALID))
    df.to_csv(folder / "again.csv", index=False)
    report = validate_manifest(folder / "again.csv")
    assert report.ok, report.problems
    assert any("derived" in w for w in report.warnings)
    assert list(report.frame["row"]) == [2, 3, 4, 5]
    assert list(report.frame["patient_id"]) == ["007", "007", "8", "8"]


def test_summary_counts(folder):
    path = write(folder, HEADER, "p1,DM,a.png,benign", "p1,US,b.png,benign",
                 "p2,DM,c.png,malignant", "p2,DM,d.png,malignant", "p3,US,e.png,benign")  # fmt: skip
    summary = summarize(load_manifest(path))
    assert summary["images"] == 5 and summary["patients"] == 3
    assert summary["patients_per_class"] == {"benign": 2, "malignant": 1}
    assert summary["images_per_modality"] == {"DM": 3, "US": 2}
    assert (summary["patients_both"], summary["patients_dm_only"]) == (1, 1)
    assert summary["patients_us_only"] == 1


def test_single_modality_patients_are_a_warning(folder):
    path = write(folder, HEADER, "p1,DM,a.png,benign", "p1,US,b.png,benign",
                 "solo,DM,c.png,malignant", "sono,US,d.png,benign")  # fmt: skip
    report = validate_manifest(path)
    assert report.ok
    assert only(report.warnings, "only DM").endswith("'solo'")
    assert only(report.warnings, "only US").endswith("'sono'")
    assert len(report.frame) == 4


# --- problems with the CSV itself -------------------------------------------------------------


def test_missing_manifest(tmp_path):
    assert problems(tmp_path / "nope.csv") == ["manifest not found"]


def test_manifest_is_a_directory(tmp_path):
    (tmp_path / "d.csv").mkdir()
    assert "not a regular file" in problems(tmp_path / "d.csv")[0]


def test_manifest_not_utf8(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(HEADER.encode() + b"\n\xff\xfe,DM,a.png,benign\n")
    assert "not UTF-8" in problems(path)[0]


def test_empty_manifest(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("")
    assert "empty" in problems(path)[0]


def test_header_without_rows(folder):
    assert "no rows" in problems(write(folder, HEADER))[0]


def test_missing_required_columns(folder):
    detail = only(problems(write(folder, "patient_id,path", "p1,a.png")), "missing required")
    assert detail.startswith("row 1:")
    assert "modality, label" in detail


def test_semicolon_file_gets_a_hint(folder):
    detail = problems(write(folder, "patient_id;modality;path;label", "p1;DM;a.png;benign"))[0]
    assert "comma-separated" in detail


def test_incomplete_box_columns(folder):
    details = problems(write(folder, HEADER + ",box_x0,box_y0", "p1,US,a.png,benign,1,2"))
    assert "box_x1, box_y1" in only(details, "incomplete box columns")


def test_row_with_too_many_fields(folder):
    details = problems(write(folder, HEADER, "p1,DM,a.png,benign", "p1,US,b.png,benign,extra"))
    assert only(details, "fields") == "row 3: has 5 fields but the header has 4"


# --- problems in values -----------------------------------------------------------------------


def test_unknown_modality_and_label(folder):
    path = write(folder, HEADER, "p1,MRI,a.png,benign", "p1,US,b.png,maybe", "p1,dm,c.png,")
    details = problems(path)
    assert only(details, "MRI") == (
        "row 2, column modality, patient 'p1': unknown modality 'MRI' (expected DM or US)"
    )
    assert only(details, "maybe").startswith("row 3, column label, patient 'p1'")
    assert only(details, "empty label").startswith("row 4, column label")
    assert len(details) == 3  # lower-case "dm" is fine


def test_empty_patient_id(folder):
    details = problems(write(folder, HEADER, "p1,DM,a.png,benign", "  ,US,b.png,benign"))
    assert only(details, "empty patient id") == "row 3, column patient_id: empty patient id"


def test_conflicting_labels_name_patient_and_rows(folder):
    path = write(folder, HEADER, "p1,DM,a.png,benign", "p1,US,b.png,malignant",
                 "p1,US,c.png,benign", "p2,DM,d.png,benign")  # fmt: skip
    detail = only(problems(path), "conflicting labels")
    assert "patient 'p1'" in detail
    assert "benign (rows 2, 4)" in detail and "malignant (row 3)" in detail


def test_duplicate_row_and_same_path_twice(folder):
    path = write(folder, HEADER, "p1,DM,a.png,benign", "p1,DM,a.png,benign",
                 "p1,US,b.png,benign", "p2,US,./b.png,benign", "p2,DM,c.png,benign")  # fmt: skip
    details = problems(path)
    assert only(details, "duplicate of row 2").startswith("row 3, column path, patient 'p1'")
    assert only(details, "same file as row 4").startswith(
        "row 5, column path, patient 'p2', file './b.png'"
    )


# --- files ------------------------------------------------------------------------------------


def test_missing_file_names_row_patient_and_file(folder):
    detail = only(problems(write(folder, HEADER, "p1,DM,gone.png,benign")), "file not found")
    assert detail.startswith("row 2, column path, patient 'p1', file 'gone.png'")
    assert str(folder / "gone.png") in detail


def test_unreadable_file_found_without_check_images(folder):
    (folder / "notes.png").write_text("not an image")
    detail = only(problems(write(folder, HEADER, "p1,DM,notes.png,benign")), "not an image")
    assert detail.startswith("row 2, column path, patient 'p1', file 'notes.png'")


def test_empty_file(folder):
    (folder / "zero.png").write_bytes(b"")
    detail = only(problems(write(folder, HEADER, "p1,DM,zero.png,benign")), "empty file")
    assert "row 2" in detail


def test_check_images_catches_decode_failures(folder):
    data = (folder / "a.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    path = write(folder, HEADER, "p1,DM,cut.png,benign", "p1,US,b.png,benign")
    assert validate_manifest(path).ok  # the header alone is intact
    detail = only(problems(path, check_images=True), "truncated")
    assert detail.startswith("row 2, column path, patient 'p1', file 'cut.png'")


def test_check_images_catches_zero_size_image(folder):
    # Pillow cannot write a 0x0 PNG; a DICOM with Rows = Columns = 0 can exist.
    from test_imaging import make_dicom

    make_dicom(folder / "zero.dcm", np.zeros((0, 0), dtype=np.uint16))
    path = write(folder, HEADER, "p1,DM,zero.dcm,benign", "p1,US,b.png,benign")
    assert "zero-size" in only(problems(path), "zero.dcm")
    assert "row 2" in only(problems(path, check_images=True), "zero.dcm")


def test_check_images_catches_constant_image(folder):
    path = write(folder, HEADER, "p1,DM,flat.png,benign", "p1,US,b.png,benign")
    assert validate_manifest(path).ok
    detail = only(problems(path, check_images=True), "constant image")
    assert detail.startswith("row 2, column path, patient 'p1', file 'flat.png'")


def test_each_file_header_read_once(folder, monkeypatch):
    calls: list[str] = []
    real = manifest_mod._inspect_file
    monkeypatch.setattr(
        manifest_mod, "_inspect_file", lambda p, full: calls.append(p) or real(p, full)
    )
    path = write(folder, HEADER, *(f"p{i},DM,{n}.png,benign" for i, n in enumerate("abcd")))
    validate_manifest(path)
    assert sorted(calls) == [str(folder / f"{n}.png") for n in "abcd"]


# --- paths ------------------------------------------------------------------------------------


def test_path_escaping_folder_is_refused_unless_allowed(folder):
    sub = folder / "sub"
    sub.mkdir()
    path = write(sub, HEADER, "p1,DM,../a.png,benign", "p1,US,x/../../b.png,benign")
    details = problems(path)
    assert only(details, "../a.png").startswith("row 2, column path, patient 'p1'")
    assert "leaves the manifest's folder" in only(details, "x/../../b.png")
    df = load_manifest(path, allow_outside=True)
    assert list(df["abs_path"]) == [str(folder / "a.png"), str(folder / "b.png")]


def test_absolute_paths_inside_are_allowed_outside_refused_unless_allowed(folder):
    sub = folder / "sub"
    sub.mkdir()
    (sub / "c.png").write_bytes((folder / "c.png").read_bytes())
    path = write(
        sub,
        HEADER,
        f"p1,DM,{folder / 'a.png'},benign",
        f"p1,US,{folder / 'b.png'},benign",
        f"p2,DM,{sub / 'c.png'},benign",
    )
    details = problems(path)
    assert len(details) == 2
    first = only(details, "a.png")
    assert first.startswith(f"row 2, column path, patient 'p1', file '{folder / 'a.png'}'")
    assert "absolute path outside the manifest's folder" in first
    assert "data.allow_outside" in first and "--allow-outside" not in first
    df = load_manifest(path, allow_outside=True)
    assert list(df["abs_path"]) == [str(folder / n) for n in ("a.png", "b.png", "sub/c.png")]


def test_symlinks_leading_outside_are_refused_unless_allowed(folder):
    sub = folder / "sub"
    (sub / "inner").mkdir(parents=True)
    (sub / "c.png").write_bytes((folder / "c.png").read_bytes())
    (sub / "a_link.png").symlink_to(folder / "a.png")  # a file link leading out
    (sub / "data").symlink_to(folder)  # a folder link leading out
    (sub / "inner_link").symlink_to(sub / "inner")  # a link that stays inside: fine
    (sub / "inner" / "d.png").write_bytes((folder / "d.png").read_bytes())
    path = write(
        sub,
        HEADER,
        "p1,DM,a_link.png,benign",
        "p1,US,data/b.png,benign",
        "p2,DM,c.png,malignant",
        "p2,US,inner_link/d.png,malignant",
    )
    details = problems(path)
    assert len(details) == 2
    link = only(details, "a_link.png")
    assert link.startswith("row 2, column path, patient 'p1', file 'a_link.png'")
    assert f"symbolic link to {folder / 'a.png'}" in link and "data.allow_outside" in link
    assert only(details, "data/b.png").startswith("row 3, column path")
    df = load_manifest(path, allow_outside=True, check_images=True)
    assert len(df) == 4


def test_manifest_folder_reached_through_a_symlink_is_fine(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("links") / "cohort"
    elsewhere.symlink_to(folder)
    write(folder, *VALID)
    df = load_manifest(elsewhere / "manifest.csv")
    assert df["abs_path"].iloc[0] == str(elsewhere / "a.png")


# --- boxes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "column", "message"),
    [
        ("1,2,,", "box", "box partially filled: box_x1, box_y1 empty"),
        ("1,two,5,6", "box_y0", "'two' is not a number"),
        ("1,2,inf,6", "box_x1", "'inf' is not a number"),
        ("5,2,5,9", "box", "empty box with zero area"),
        ("8,2,3,9", "box", "inverted box"),
        ("8,9,9,4", "box", "inverted box"),
        ("10,5,31,15", "box", "lies outside the image (30x20 pixels)"),
        ("-1,5,10,15", "box", "lies outside the image"),
        ("1,5,10,21", "box", "lies outside the image"),
    ],
)
def test_bad_boxes(folder, box, column, message):
    path = write(folder, BOX_HEADER, "p1,DM,a.png,benign,,,,", f"p1,US,b.png,benign,{box}")
    detail = only(problems(path), message)
    assert detail.startswith(f"row 3, column {column}, patient 'p1'")


def test_box_touching_the_border_is_fine(folder):
    path = write(folder, BOX_HEADER, "p1,DM,a.png,benign,,,,", "p1,US,b.png,benign,0,0,30,20")
    assert validate_manifest(path).ok


# --- everything at once, and the CLI ----------------------------------------------------------

BAD = (
    BOX_HEADER,
    "p1,MRI,a.png,benign,,,,",  # 2 unknown modality
    ",DM,b.png,benign,,,,",  # 3 empty patient
    "p2,DM,gone.png,malignant,,,,",  # 4 missing file (+ conflicting labels of p2)
    "p2,US,c.png,benign,5,5,1,1",  # 5 inverted box
    "p3,US,../d.png,benign,,,,",  # 6 escapes the folder
    "p4,US,e.png,benign,0,0,40,10",  # 7 box outside
)


def test_every_problem_is_listed(folder):
    details = problems(write(folder, *BAD))
    rows = [d.split(",")[0] for d in details]
    assert rows == ["row 2", "row 3", "row 4", "row 4", "row 5", "row 6", "row 7"], details
    for text in ("MRI", "empty patient id", "gone.png", "conflicting", "inverted", "../d.png"):
        only(details, text)
    only(details, "outside the image")


def test_cli_lists_problems_and_exits_2(folder, capsys):
    code = main(["validate", str(write(folder, *BAD))])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ")
    assert "Traceback" not in captured.err + captured.out
    assert "row 2, column modality, patient 'p1'" in captured.err
    assert "row 7, column box, patient 'p4', file 'e.png'" in captured.err


def test_cli_missing_manifest_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err
    assert "nope.csv" in err and "manifest not found" in err and "Traceback" not in err


def test_cli_prints_summary_and_warnings_exits_0(folder, capsys):
    path = write(folder, *VALID[:-1])  # patient 8 has only DM
    code = main(["validate", str(path), "--check-images"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "images: 3 (DM 2, US 1)" in captured.out
    assert "patients: 2 (benign 1, malignant 1)" in captured.out
    assert "warning: 1 patient(s) have only DM images" in captured.err


def test_cli_allow_outside(folder, capsys):
    sub = folder / "sub"
    sub.mkdir()
    path = write(sub, HEADER, "p1,DM,../a.png,benign", "p1,US,../b.png,benign")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pass --allow-outside to permit it" in err and "data.allow_outside" not in err
    assert main(["validate", str(path), "--allow-outside"]) == 0
    assert "valid" in capsys.readouterr().out


def test_import_stays_light():
    code = (
        "import sys, breastfusion.data.manifest, breastfusion.data.imaging; "
        "heavy = [m for m in ('torch', 'ray', 'ultralytics') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    src = str(Path(manifest_mod.__file__).parents[2])
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}
    )
    assert result.returncode == 0, result.stderr


def test_frame_types(folder):
    df = load_manifest(write(folder, *VALID))
    assert isinstance(df, pd.DataFrame)
    assert df["y"].dtype == np.int64 and df["row"].dtype == np.int64
    assert all(isinstance(v, str) for v in df["patient_id"])


def test_logic_modules_do_not_import_click():
    code = (
        "import sys, breastfusion.data.manifest, breastfusion.data.splits, "
        "breastfusion.data.near_duplicates; assert 'click' not in sys.modules"
    )
    src = str(Path(manifest_mod.__file__).parents[2])
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}
    )
    assert result.returncode == 0, result.stderr


def test_stored_paths_relative_inside_and_how_they_leave_the_folder(tmp_path):
    """``io.portable_path`` (manifest image paths) never climbs out with ``..``;
    ``io.relative_ref`` (references read back against their file's folder) does."""
    from breastfusion.io import portable_path, relative_ref

    folder = tmp_path / "cohort"
    inside, outside = folder / "dm" / "a.png", tmp_path / "elsewhere" / "b.png"
    assert portable_path(inside, folder) == "dm/a.png" == relative_ref(inside, folder)
    assert portable_path(outside, folder) == outside.as_posix()
    assert relative_ref(outside, folder) == "../elsewhere/b.png"
    assert portable_path(tmp_path, folder) == tmp_path.as_posix()
    assert relative_ref(tmp_path, folder) == ".."
