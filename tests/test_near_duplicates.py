"""Near duplicates: hashing, pairs, pseudo-patients at import, and leakage checks.

The fixture is BUSI-like: ultrasound-looking images (a fan of speckled tissue with a dark
lesion) and copies made here by resizing and shifting the brightness, as in the real set.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastfusion.cli import main
from breastfusion.data import near_duplicates as nd
from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import load_splits, make_splits, write_splits
from breastfusion.errors import SplitError
from breastfusion.importers.busi import import_busi
from breastfusion.importers.common import near_duplicates_path

SIZE = (64, 56)


def us_like(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A fan of speckled tissue with a dark elliptic lesion; every seed a different scan."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w / 2 + rng.uniform(-4, 4)
    fan = (np.abs(np.arctan2(xx - cx, yy + 10)) < rng.uniform(0.5, 0.7)).astype(np.float32)
    tissue = 120 + 60 * np.sin(xx / rng.uniform(5, 12) + rng.uniform(0, 6)) * np.cos(
        yy / rng.uniform(5, 12)
    )
    lx, ly = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h)
    rx, ry = rng.uniform(4, 12), rng.uniform(3, 9)
    img = fan * tissue * rng.gamma(2.0, 0.5, (h, w)) * (1 - 0.004 * yy)
    img[((xx - lx) / rx) ** 2 + ((yy - ly) / ry) ** 2 < 1] *= 0.25
    return np.clip(img, 0, 255).astype(np.uint8)


def resized(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))


def brighter(a: np.ndarray, d: int) -> np.ndarray:
    return np.clip(a.astype(int) + d, 0, 255).astype(np.uint8)


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def busi_copies(tmp_path) -> Path:
    """16 benign + 8 malignant scans, plus copies:

    - benign (101): benign (1) resized to 80x70             -> pair, same label
    - benign (102): benign (2) 25 grey levels brighter       -> chain of three with
    - benign (103): benign (2) darker and resized to 50x44      benign (2): three pairs
    - malignant (101): malignant (1) resized                -> pair, same label
    - malignant (102): benign (3) resized                   -> pair, conflicting labels
    - benign (104): pixel copy of benign (4)                -> exact duplicate, not "near"
    """
    root = tmp_path / "Dataset_BUSI_with_GT"
    scans = {f"benign ({i})": us_like(i) for i in range(1, 17)}
    scans |= {f"malignant ({i})": us_like(100 + i) for i in range(1, 9)}
    scans["benign (101)"] = resized(scans["benign (1)"], (80, 70))
    scans["benign (102)"] = brighter(scans["benign (2)"], 25)
    scans["benign (103)"] = resized(brighter(scans["benign (2)"], -15), (50, 44))
    scans["malignant (101)"] = resized(scans["malignant (1)"], (72, 60))
    scans["malignant (102)"] = resized(scans["benign (3)"], (70, 62))
    scans["benign (104)"] = scans["benign (4)"].copy()
    for name, arr in scans.items():
        save(root / name.split(" ")[0] / f"{name}.png", arr)
    return root


def pid(rows: dict[str, dict[str, str]], name: str) -> str:
    return rows[name]["patient_id"]


def manifest_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {Path(r["path"]).stem: r for r in csv.DictReader(fh)}


# --------------------------------------------------------------------------------------------
# the library


@pytest.mark.parametrize("block_cells", [4_000_000, 1000])  # one block; blocks of 3 rows
def test_hash_pairs_match_brute_force(monkeypatch, block_cells):
    monkeypatch.setattr(nd, "_BLOCK_CELLS", block_cells)
    rng = np.random.default_rng(0)
    codes = [int(c) for c in rng.integers(0, 2**63, 300, dtype=np.int64)]
    codes += [codes[5] ^ 0b1011, codes[7], codes[9] ^ (1 << 63)]  # 3, 0 and 1 bits apart
    got = nd.hash_pairs(codes, max_distance=3)
    want = [
        (i, j, bin(codes[i] ^ codes[j]).count("1"))
        for i in range(len(codes))
        for j in range(i + 1, len(codes))
        if bin(codes[i] ^ codes[j]).count("1") <= 3
    ]
    assert sorted(got) == sorted(want) and len(want) >= 3


def test_copies_are_close_and_distinct_scans_far():
    a = us_like(1)
    sig = nd.signature_of(a)
    for copy in (resized(a, (80, 70)), brighter(a, 25), resized(brighter(a, -15), (50, 44))):
        other = nd.signature_of(copy)
        assert bin(sig.code ^ other.code).count("1") <= nd.MAX_DISTANCE
        assert nd.correlation(sig, other) > 0.99
    others = [nd.signature_of(us_like(s)).code for s in range(2, 40)]
    assert min(bin(sig.code ^ c).count("1") for c in others) > nd.MAX_DISTANCE


def test_flat_images_do_not_pair():
    """Blank frames and masks have no gradients: equal hashes, but nothing to compare."""
    flat = [np.zeros((30, 40)), np.full((30, 40), 7.0), np.pad(np.ones((4, 4)), 13)[:30, :40]]
    sigs = [nd.signature_of(a) for a in flat]
    items = [nd.Item(name=str(i), patient=str(i), label="benign", modality="US") for i in range(3)]
    assert nd.find_pairs(items, sigs) == []


def film(seed: int, size: tuple[int, int] = (64, 80)) -> np.ndarray:
    """A mammogram-like film: one breast silhouette (same view and side for every seed),
    a different coarse parenchyma texture per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inside = (xx / (0.8 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 < 1
    texture = rng.uniform(110, 190, (h // 4, w // 4)).astype(np.float32)
    texture = np.asarray(Image.fromarray(texture).resize((w, h), Image.Resampling.BICUBIC))
    return np.clip(np.where(inside, texture * (1 - 0.5 * xx / w), 0), 0, 255).astype(np.uint8)


def test_films_of_one_view_are_not_near_duplicates(monkeypatch):
    """The coarse hash sees silhouettes: distinct films of one view match on it alone."""
    films = [film(s) for s in range(12)] + [resized(film(0), (72, 90)), brighter(film(1), 20)]
    sigs = [nd.signature_of(a) for a in films]
    items = [
        nd.Item(name=f"f{i}", patient=f"p{i}", label="benign", modality="DM")
        for i in range(len(films))
    ]
    pairs = nd.find_pairs(items, sigs)
    assert [(p.a.name, p.b.name) for p in pairs] == [("f0", "f12"), ("f1", "f13")]
    monkeypatch.setattr(nd, "MAX_FINE_DISTANCE", 256)  # the coarse hash alone
    coarse_only = nd.find_pairs(items, sigs)
    false = [p for p in coarse_only if {p.a.name, p.b.name} not in ({"f0", "f12"}, {"f1", "f13"})]
    assert false and min(p.fine_distance for p in false) > 32  # measured: 31 pairs, 48+ bits apart


def test_components_join_chains():
    groups = nd.components([("c", "d"), ("a", "b"), ("b", "e"), ("x", "x")])
    assert groups == [["a", "b", "e"], ["c", "d"], ["x"]]


# --------------------------------------------------------------------------------------------
# import: one pseudo-patient per group of copies


def test_busi_groups_near_duplicates_by_default(busi_copies, tmp_path):
    out = tmp_path / "out" / "busi.csv"
    report = import_busi(busi_copies, out)
    rows = manifest_rows(out)
    # Measured on this fixture: 6 pairs in 4 groups; 3 grouped, 1 excluded (2 images).
    assert len(report.near_duplicate_pairs) == 6
    assert report.near_groups == 3 and report.near_excluded_groups == 1
    assert pid(rows, "benign (1)") == pid(rows, "benign (101)")
    assert pid(rows, "benign (2)") == pid(rows, "benign (102)") == pid(rows, "benign (103)")
    assert pid(rows, "malignant (1)") == pid(rows, "malignant (101)")
    assert pid(rows, "benign (4)") == pid(rows, "benign (104)")  # exact copy, grouped as before
    assert "benign (3)" not in rows and "malignant (102)" not in rows
    assert report.skipped["near duplicate with conflicting labels"] == 2
    assert report.read == 30 == report.written + report.n_skipped
    assert report.patients == 30 - 2 - 1 - 2 - 1 - 1  # 23
    # The pairs, with what was done, next to the manifest (and in the JSON-ready report).
    listed = near_duplicates_path(out)
    assert listed == out.parent / "busi.near_duplicates.csv" == Path(report.near_duplicates_csv)
    with open(listed, newline="") as fh:
        pairs = list(csv.DictReader(fh))
    assert len(pairs) == 6
    assert sorted(p["action"] for p in pairs).count("grouped") == 5
    conflict = [p for p in pairs if p["action"] == "excluded: conflicting labels"]
    assert {conflict[0]["image_a"], conflict[0]["image_b"]} == {
        "benign/benign (3).png",
        "malignant/malignant (102).png",
    }
    assert all(float(p["correlation"]) > 0.99 and int(p["distance"]) <= 4 for p in pairs)
    assert all(int(p["fine_distance"]) <= nd.MAX_FINE_DISTANCE for p in pairs)
    json.dumps(report.to_dict(), allow_nan=False)  # valid JSON: no NaN anywhere
    text = report.summary()
    assert "near duplicates across patients: 6 pair(s); 3 group(s) made one patient" in text
    assert str(listed) in text


def test_grouped_import_leaves_nothing_to_leak(busi_copies, tmp_path):
    out = tmp_path / "busi.csv"
    import_busi(busi_copies, out)
    df = load_manifest(out, allow_outside=True)
    assert nd.manifest_pairs(df) == []  # no near duplicates across patients remain


def test_report_policy_lists_pairs_and_off_removes_a_stale_list(busi_copies, tmp_path):
    out = tmp_path / "busi.csv"
    report = import_busi(busi_copies, out, near_duplicates="report")
    rows = manifest_rows(out)
    assert len(report.near_duplicate_pairs) == 6 and report.near_groups == 0
    assert pid(rows, "benign (1)") != pid(rows, "benign (101)")
    assert "malignant (102)" in rows and report.written == 30  # every image kept
    assert any("only reported" in w for w in report.warnings)
    assert near_duplicates_path(out).is_file()
    (tmp_path / "notes.near_duplicates.csv").write_text("mine\n")  # not ours: kept
    report = import_busi(busi_copies, out, near_duplicates="off")
    assert report.near_duplicate_pairs == [] and not near_duplicates_path(out).exists()
    assert (tmp_path / "notes.near_duplicates.csv").read_text() == "mine\n"


def test_cli_import_counts_pairs_and_names_the_list(busi_copies, tmp_path, capsys):
    out = tmp_path / "busi.csv"
    assert main(["import", "busi", str(busi_copies), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "near duplicates across patients: 6 pair(s)" in text
    assert "busi.near_duplicates.csv" in text and "option '" not in text
    assert "--patient-map" in text  # the note names the flag on the command line
    code = main(["import", "busi", str(busi_copies), "--out", str(out), "--near-duplicates", "x"])
    assert code == 2


# --------------------------------------------------------------------------------------------
# validate and split: leakage across partitions


@pytest.fixture
def ungrouped(busi_copies, tmp_path) -> Path:
    """A manifest whose copies are separate patients (as a BUSI import did before)."""
    out = busi_copies / "manifest.csv"  # inside the data folder: relative paths
    import_busi(busi_copies, out, near_duplicates="report")
    return out


def test_manifest_pairs_across_patients(ungrouped):
    df = load_manifest(ungrouped)
    pairs = nd.manifest_pairs(df)
    assert len(pairs) == 6 and sum(p.conflicting for p in pairs) == 1
    assert all(p.a.patient != p.b.patient and p.a.row is not None for p in pairs)


def test_validate_warns_about_pairs_straddling_partitions(ungrouped, tmp_path, capsys):
    df = load_manifest(ungrouped)
    splits = write_splits(make_splits(df, folds=3, holdout=0.2, seed=1), tmp_path / "s.json")
    leaks = nd.straddling(nd.manifest_pairs(df), load_splits(splits, df))
    assert leaks  # 6 pairs over 4 places: some straddle
    pairs_csv = tmp_path / "pairs.csv"
    argv = ["validate", str(ungrouped), "--near-duplicates", "--splits", str(splits)]
    code = main([*argv, "--pairs-csv", str(pairs_csv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "near duplicates across patients: 6 pair(s)" in captured.out
    assert "1 with conflicting labels" in captured.out
    holdout = sum("holdout" in (a, b) for _, a, b in leaks)
    assert (
        f"warning: {len(leaks)} near-duplicate pair(s) straddle partitions of {splits} "
        f"({holdout} across development and holdout): leakage"
    ) in captured.err
    with open(pairs_csv, newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert len(listed) == 6 and sum(r["place_a"] != r["place_b"] for r in listed) == len(leaks)
    assert all(r["row_a"].isdigit() for r in listed)


def test_split_refuses_near_duplicates_across_patients(ungrouped, tmp_path, capsys):
    out = tmp_path / "s.json"
    code = main(["split", str(ungrouped), "--near-duplicates", "--folds", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and "Traceback" not in err
    assert err.startswith(f"error: {ungrouped}: 6 near-duplicate image pair(s) join 4 group(s)")
    assert "(--near-duplicates)" in err and "benign (101).png" in err
    with pytest.raises(SplitError, match="splits.near_duplicates"):
        nd.refuse_across_patients(nd.manifest_pairs(load_manifest(ungrouped)), "m.csv")


def test_split_with_the_check_passes_on_a_grouped_import(busi_copies, tmp_path, capsys):
    out = busi_copies / "grouped.csv"
    import_busi(busi_copies, out)
    splits = tmp_path / "s.json"
    argv = ["split", str(out), "--near-duplicates", "--folds", "3", "--out", str(splits)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "near duplicates: none across patients" in capsys.readouterr().out
    assert json.loads(splits.read_text())["folds_k"] == 3


def test_validate_near_duplicates_names_an_undecodable_image(ungrouped, capsys):
    victim = ungrouped.parent / "benign" / "benign (5).png"
    victim.write_bytes(victim.read_bytes()[:60])  # header intact, pixels cut off
    code = main(["validate", str(ungrouped), "--near-duplicates"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "cannot check near duplicates" in err and "benign/benign (5).png" in err
