"""Patient-level splits: stratification, determinism, leakage detection, refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from breastfusion.cli import main as cli_main
from breastfusion.data import splits as sp
from breastfusion.data.cli import split_command
from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import (
    Splits,
    check_splits,
    load_splits,
    make_splits,
    write_splits,
)
from breastfusion.errors import SplitError
from breastfusion.io import sha256_file


def cohort(n_benign: int = 60, n_malignant: int = 20, seed: int = 0) -> pd.DataFrame:
    """A manifest-like table: several image rows per patient, as the loader returns it."""
    rng = np.random.default_rng(seed)
    rows = []
    labels = [0] * n_benign + [1] * n_malignant
    for i, y in enumerate(labels):
        pid = f"P{i:03d}"
        for j in range(int(rng.integers(1, 5))):
            rows.append({"patient_id": pid, "modality": "DM" if j % 2 else "US", "y": y})
    return pd.DataFrame(rows)


def test_stratified_folds_and_holdout():
    df = cohort(60, 20)
    s = make_splits(df, folds=5, holdout=0.2, seed=3)
    assert s["n_holdout"] == 16
    # Holdout has the cohort's class ratio (25% malignant -> 4 of 16).
    assert s["n_holdout_malignant"] == 4 and s["n_holdout_benign"] == 12
    assert len(s["folds"]) == 5
    n_dev = s["n_development"]
    dev_mal = 20 - s["n_holdout_malignant"]
    for f in s["folds"]:
        assert f["n_val"] == len(f["val"]) == f["n_val_malignant"] + f["n_val_benign"]
        assert abs(f["n_val_malignant"] - dev_mal / 5) <= 1
        assert abs(f["n_val"] - n_dev / 5) <= 1
    labels = df.groupby("patient_id")["y"].first()
    for f in s["folds"]:
        assert int(labels.loc[f["val"]].sum()) == f["n_val_malignant"]
    assert s["holdout"] == sorted(s["holdout"])
    assert all(f["val"] == sorted(f["val"]) for f in s["folds"])


def test_no_patient_images_split_across_places():
    df = cohort(50, 25, seed=1)
    s = make_splits(df, folds=4, holdout=0.25, seed=0)
    place = {pid: "holdout" for pid in s["holdout"]}
    for k, f in enumerate(s["folds"]):
        for pid in f["val"]:
            assert pid not in place, f"{pid} in two places"
            place[pid] = f"fold {k}"
    # Every image row maps to exactly one place, the same for all rows of a patient.
    per_patient = df.assign(place=df["patient_id"].map(place)).groupby("patient_id")["place"]
    assert per_patient.nunique().eq(1).all()
    assert df["patient_id"].map(place).notna().all()


def test_deterministic_bytes(tmp_path):
    df = cohort()
    a = write_splits(make_splits(df, 5, 0.2, 7, "abc"), tmp_path / "a.json")
    # Row order must not matter: shuffle the image rows.
    shuffled = df.sample(frac=1.0, random_state=5).reset_index(drop=True)
    b = write_splits(make_splits(shuffled, 5, 0.2, 7, "abc"), tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    c = write_splits(make_splits(df, 5, 0.2, 8, "abc"), tmp_path / "c.json")
    assert a.read_bytes() != c.read_bytes()
    data = json.loads(a.read_text())
    for key in ("seed", "folds_k", "holdout_fraction", "manifest_sha256", "holdout", "folds"):
        assert key in data
    assert data["seed"] == 7 and data["folds_k"] == 5 and data["manifest_sha256"] == "abc"


def test_holdout_zero_means_no_holdout():
    s = make_splits(cohort(20, 10), folds=5, holdout=0.0)
    assert s["holdout"] == [] and s["n_development"] == 30


@pytest.mark.parametrize("folds", [1, 0, -3])
def test_refuses_too_few_folds(folds):
    with pytest.raises(SplitError, match="splits.folds must be an integer of at least 2"):
        make_splits(cohort(), folds=folds)


@pytest.mark.parametrize("holdout", [1.0, 1.5, -0.1, float("nan")])
def test_refuses_holdout_out_of_range(holdout):
    with pytest.raises(SplitError, match=r"splits.holdout must be a fraction in \[0, 1\)"):
        make_splits(cohort(), holdout=holdout)


def test_refuses_too_few_patients_of_a_class():
    df = cohort(n_benign=30, n_malignant=5)
    # 5 malignant, 1 goes to the holdout -> 4 left for 5 folds.
    with pytest.raises(SplitError) as exc:
        make_splits(df, folds=5, holdout=0.2)
    msg = str(exc.value)
    assert "too few malignant patients for 5 folds: 4" in msg
    assert "5 in total" in msg and "at least 5 needed" in msg
    with pytest.raises(SplitError, match="too few malignant patients for 6 folds: 5 in the"):
        make_splits(df, folds=6, holdout=0.0)


def test_refuses_missing_class():
    df = cohort(n_benign=30, n_malignant=0)
    with pytest.raises(SplitError, match="no malignant patient|too few malignant"):
        make_splits(df, folds=3, holdout=0.2)
    with pytest.raises(SplitError, match="too few malignant patients for 3 folds: 0"):
        make_splits(df, folds=3, holdout=0.0)


def test_refuses_empty_holdout():
    with pytest.raises(SplitError, match="would leave the holdout empty"):
        make_splits(cohort(20, 10), folds=3, holdout=0.01)


def test_refuses_holdout_without_a_class():
    # 0.05 of 42 patients -> 2 in the holdout, both benign (2 malignant * 2/42 rounds to 0).
    with pytest.raises(SplitError, match="would hold no malignant patient"):
        make_splits(cohort(40, 2), folds=2, holdout=0.05)


def test_refuses_fold_without_a_class(monkeypatch):
    class Lopsided:
        """A splitter that puts all malignant patients in one fold."""

        def __init__(self, n_splits, **_):
            self.n_splits = n_splits

        def split(self, X, y, groups=None):
            y = np.asarray(y)
            mal, ben = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
            yield np.array([]), mal
            for part in np.array_split(ben, self.n_splits - 1):
                yield np.array([]), part

    import sklearn.model_selection

    monkeypatch.setattr(sklearn.model_selection, "StratifiedGroupKFold", Lopsided)
    with pytest.raises(SplitError, match="fold 0 would hold no benign patient"):
        make_splits(cohort(), folds=3, holdout=0.0)


def test_refuses_conflicting_labels():
    df = cohort()
    df.loc[len(df)] = {"patient_id": "P000", "modality": "US", "y": 1}
    with pytest.raises(SplitError, match="both labels: P000"):
        make_splits(df)


# ---- reading and leakage -------------------------------------------------------------------


@pytest.fixture
def written(tmp_path):
    df = cohort()
    path = write_splits(make_splits(df, 4, 0.2, 0, "sha-of-manifest"), tmp_path / "splits.json")
    return df, path


def test_load_and_train_val(written):
    df, path = written
    s = load_splits(path, df)
    assert isinstance(s, Splits) and s.k == 4 and s.seed == 0
    all_ids = set(df["patient_id"])
    assert set(s.development) | set(s.holdout) == all_ids
    assert not set(s.development) & set(s.holdout)
    seen_val: set[str] = set()
    for k in range(s.k):
        train, val = s.train_val(k)
        assert val == s.folds[k].val
        assert not set(train) & set(val)
        assert not (set(train) | set(val)) & set(s.holdout)
        assert set(train) | set(val) == set(s.development)
        assert all(isinstance(p, str) for p in train + val)
        seen_val |= set(val)
    assert seen_val == set(s.development)


@pytest.mark.parametrize("k", [4, -1, 10])
def test_train_val_out_of_range(written, k):
    df, path = written
    s = load_splits(path, df)
    with pytest.raises(
        SplitError, match=r"fold .* does not exist in .*splits.json: valid folds are 0\.\.3"
    ):
        s.train_val(k)


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_leak_holdout_and_fold(written):
    df, path = written
    data = json.loads(path.read_text())
    victim = data["holdout"][0]
    _edit(path, lambda d: d["folds"][2]["val"].append(victim))
    with pytest.raises(SplitError) as exc:
        load_splits(path, df)
    assert f"{victim} (holdout and fold 2)" in str(exc.value)
    assert str(path) in str(exc.value)


def test_leak_two_folds(written):
    df, path = written
    victim = json.loads(path.read_text())["folds"][0]["val"][0]
    _edit(path, lambda d: d["folds"][3]["val"].append(victim))
    with pytest.raises(SplitError, match=rf"{victim} \(fold 0 and fold 3\)"):
        load_splits(path, df)


def test_manifest_patient_missing(written):
    df, path = written
    victim = json.loads(path.read_text())["folds"][1]["val"][0]
    _edit(path, lambda d: d["folds"][1]["val"].remove(victim))
    with pytest.raises(SplitError, match=rf"in neither the holdout nor any fold: {victim}"):
        load_splits(path, df)


def test_splits_patient_not_in_manifest(written):
    df, path = written
    _edit(path, lambda d: d["holdout"].append("GHOST-1"))
    with pytest.raises(SplitError, match="in the splits but not in the manifest: GHOST-1"):
        load_splits(path, df)
    # The same check on a manifest that lost a patient.
    df2, path2 = written
    smaller = df2[df2["patient_id"] != "P001"]
    path2.write_text(json.dumps(make_splits(df2, 4, 0.2, 0)))
    with pytest.raises(SplitError, match="not in the manifest: P001"):
        load_splits(path2, smaller)


def test_check_splits_accepts_consistent_splits(written):
    df, path = written
    s = load_splits(path, df)
    check_splits(s, df)  # no error


def test_sha_mismatch_only_warns(written, caplog):
    df, path = written
    with caplog.at_level(logging.WARNING, logger=sp.__name__):
        s = load_splits(path, df, manifest_sha256="another-sha")
    assert s.k == 4
    assert "sha256" in caplog.text and "another-sha"[:12] in caplog.text


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[]", "top level is not a JSON object"),
        ('{"holdout": [], "seed": 0}', "missing key 'folds'"),
        ('{"holdout": [], "seed": 0, "folds": [{"val": []}]}', "at least 2 folds"),
        ('{"holdout": [1], "seed": 0, "folds": [{"val": []}, {"val": []}]}', "'holdout' must"),
        ('{"holdout": [], "seed": 0, "folds": [{"x": 1}, {"val": []}]}', "fold 0 has no 'val'"),
    ],
)
def test_malformed_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SplitError, match=match) as exc:
        load_splits(path, cohort())
    assert str(path) in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(SplitError, match="nope.json: splits file not found"):
        load_splits(tmp_path / "nope.json", cohort())


# ---- command line --------------------------------------------------------------------------


def _write_manifest(folder, n_benign=30, n_malignant=12):
    rows = []
    for i in range(n_benign + n_malignant):
        label = "malignant" if i >= n_benign else "benign"
        for mod in ("DM", "US"):
            name = f"p{i:03d}_{mod}.png"
            Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(folder / name)
            rows.append(f"P{i:03d},{mod},{name},{label}")
    path = folder / "manifest.csv"
    path.write_text("patient_id,modality,path,label\n" + "\n".join(rows) + "\n")
    return path


def test_split_command(tmp_path):
    manifest = _write_manifest(tmp_path)
    out = tmp_path / "splits.json"
    args = [str(manifest), "--folds", "3", "--holdout", "0.2", "--seed", "1", "--out", str(out)]
    result = CliRunner().invoke(split_command, args)
    assert result.exit_code == 0, result.output
    assert "fold 2" in result.output and "holdout" in result.output
    assert "malignant" in result.output
    first = out.read_bytes()
    data = json.loads(first)
    assert data["folds_k"] == 3 and data["seed"] == 1
    assert data["manifest_sha256"] == sha256_file(manifest)
    assert CliRunner().invoke(split_command, args).exit_code == 0
    assert out.read_bytes() == first
    # The file round-trips through the real manifest loader and the leakage check.
    splits = load_splits(out, load_manifest(manifest), manifest_sha256=sha256_file(manifest))
    assert splits.k == 3 and len(splits.holdout) == data["n_holdout"]


def test_split_command_refusal_is_a_clean_error(tmp_path, capsys):
    manifest = _write_manifest(tmp_path)
    out = tmp_path / "splits.json"
    code = cli_main(["split", str(manifest), "--folds", "20", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: too few malignant patients for 20 folds: ")
    assert "Traceback" not in err and not out.exists()


# ---- subsampling (data.max_patients) -------------------------------------------------------

SUB_IDS = [f"P{i:02d}" for i in range(20)]
SUB_LABELS = pd.Series([1 if i % 4 == 0 else 0 for i in range(20)], index=SUB_IDS)


@pytest.mark.parametrize(
    ("ids", "n", "seed", "expected"),
    [
        # Computed once from the engine's former ``_subset`` (same draws, same order).
        (SUB_IDS, 6, 0, ["P01", "P02", "P05", "P06", "P12", "P16"]),
        (SUB_IDS, 6, 1, ["P01", "P03", "P04", "P08", "P15", "P17"]),
        (SUB_IDS, 5, 7, ["P10", "P11", "P16", "P17", "P19"]),
        (SUB_IDS, 1, 3, ["P16"]),
        (SUB_IDS, 19, 2, [p for p in SUB_IDS if p != "P15"]),
        (SUB_IDS, 20, 0, SUB_IDS),
        (SUB_IDS[::-1], 7, 4, ["P18", "P13", "P08", "P05", "P03", "P02", "P00"]),
        ([p for p in SUB_IDS if SUB_LABELS[p] == 0], 4, 5, ["P01", "P11", "P14", "P17"]),
        ([p for p in SUB_IDS if SUB_LABELS[p] == 1], 2, 0, ["P12", "P16"]),
        (SUB_IDS[:3], 2, 0, ["P00", "P02"]),
    ],
)
def test_subsample_patients_matches_fixed_draws(ids, n, seed, expected):
    assert sp.subsample_patients(ids, SUB_LABELS, n, seed) == expected


def test_subsample_patients_keeps_each_class_and_refuses_bad_input():
    kept = sp.subsample_patients(SUB_IDS, SUB_LABELS, 3, seed=9)
    assert len(kept) == 3 and set(SUB_LABELS[kept]) == {0, 1}
    with pytest.raises(SplitError, match=r"data.max_patients must be a positive integer \(got 0\)"):
        sp.subsample_patients(SUB_IDS, SUB_LABELS, 0, seed=0)
    with pytest.raises(SplitError, match="no label for patient.*GHOST"):
        sp.subsample_patients([*SUB_IDS, "GHOST"], SUB_LABELS, 3, seed=0)


# ---- fold-count problems are reported as such ----------------------------------------------


def test_fold_problem_names_both_classes_and_numbers_the_fixes():
    df = cohort(n_benign=30, n_malignant=5)  # 1 malignant in a 0.2 holdout, 4 left for 5 folds
    with pytest.raises(SplitError) as exc:
        make_splits(df, folds=5, holdout=0.2)
    msg = str(exc.value)
    assert "development patients: benign 24, malignant 4 for splits.folds = 5" in msg
    assert "at most 4 folds (splits.folds)" in msg
    # 0.1 of 35 patients -> 4 in the holdout (3 benign, 1 malignant): still 4 malignant left;
    # only a holdout without a malignant patient would do, which the holdout check refuses.
    assert "no holdout (splits.holdout: 0)" in msg
    assert "--" not in msg


def test_fold_problem_advises_a_smaller_holdout_when_one_works():
    df = cohort(n_benign=40, n_malignant=12)  # 0.5 holdout -> 6 malignant left for 8 folds
    with pytest.raises(SplitError) as exc:
        make_splits(df, folds=8, holdout=0.5)
    msg = str(exc.value)
    assert msg.startswith("too few malignant patients for 8 folds: 6 left after a 0.5 holdout")
    assert "at most 6 folds (splits.folds)" in msg
    # 0.37 of 52 -> 19 held out, 4 malignant, 8 left; 0.38 -> 20 with 5 malignant, 7 left.
    assert "a smaller holdout such as splits.holdout: 0.37" in msg
    make_splits(df, folds=8, holdout=0.37)  # the advice works


def test_fold_problem_is_reported_before_the_holdout_problem():
    # 3 malignant, 4 folds: no holdout fraction can help; the old message blamed the holdout
    # ("use a larger fraction"), which only makes the folds worse.
    df = cohort(n_benign=60, n_malignant=3)
    with pytest.raises(SplitError) as exc:
        make_splits(df, folds=4, holdout=0.05)
    msg = str(exc.value)
    assert msg.startswith("too few malignant patients for 4 folds: 3 left after a 0.05 holdout")
    assert "at most 3 folds (splits.folds)" in msg and "larger fraction" not in msg
    assert "splits.holdout" not in msg  # no holdout fraction fixes it


def test_holdout_problem_names_a_fraction_that_works():
    with pytest.raises(SplitError) as exc:
        make_splits(cohort(40, 6), folds=2, holdout=0.05)  # 3 holdout patients, 0 malignant
    assert "would hold no malignant patient" in str(exc.value)
    # 0.07 of 46 -> 3 held out (0 malignant); 0.08 -> 4, one of them malignant.
    assert "use a larger fraction (splits.holdout: 0.08)" in str(exc.value)
    make_splits(cohort(40, 6), folds=2, holdout=0.08)


def test_split_command_names_flags_not_study_keys(tmp_path, capsys):
    manifest = _write_manifest(tmp_path, n_benign=30, n_malignant=5)
    out = tmp_path / "splits.json"
    code = cli_main(["split", str(manifest), "--folds", "5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "at most 4 folds (--folds)" in err and "splits." not in err


def test_split_command_allow_outside(tmp_path, capsys):
    manifest = _write_manifest(tmp_path, n_benign=6, n_malignant=4)
    sub = tmp_path / "sub"
    sub.mkdir()
    moved = sub / "manifest.csv"  # the same rows, now one folder below their images
    moved.write_text(manifest.read_text().replace(",p0", ",../p0"))
    out = tmp_path / "splits.json"
    argv = ["split", str(moved), "--folds", "2", "--holdout", "0", "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "via '..' (pass --allow-outside to permit it)" in err and not out.exists()
    assert cli_main([*argv, "--allow-outside"]) == 0
    assert json.loads(out.read_text())["n_patients"] == 10


def test_validate_command_checks_a_splits_file(tmp_path, capsys):
    manifest = _write_manifest(tmp_path, n_benign=6, n_malignant=4)
    good = tmp_path / "splits.json"
    assert (
        cli_main(["split", str(manifest), "--folds", "2", "--holdout", "0", "--out", str(good)])
        == 0
    )
    capsys.readouterr()
    assert cli_main(["validate", str(manifest), "--splits", str(good)]) == 0
    assert f"{good}: matches the manifest (2 folds, 0 holdout patients)" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    data = json.loads(good.read_text())
    data["holdout"] = [data["folds"][0]["val"][0]]
    bad.write_text(json.dumps(data))
    assert cli_main(["validate", str(manifest), "--splits", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {bad}: splits do not match the manifest") and "Traceback" not in err
    )
    assert cli_main(["validate", str(manifest), "--pairs-csv", str(tmp_path / "p.csv")]) == 2
    assert "--pairs-csv needs --near-duplicates" in capsys.readouterr().err
