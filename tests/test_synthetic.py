"""The synthetic cohort: deterministic, study-like proportions, valid boxes, real lesions."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastfusion.data.synthetic import PRESETS, generate_cohort, plan_cohort, writer
from breastfusion.data.synthetic.cli import synth_command
from breastfusion.errors import UserError


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _grey(path: Path) -> np.ndarray:
    if path.suffix == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path)
        return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    arr = np.asarray(Image.open(path)).astype(np.float64)
    return arr.mean(axis=2) if arr.ndim == 3 else arr


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cohort(
        tmp_path_factory.mktemp("medium"), n_patients=200, seed=3, size=32, workers=1
    )


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _all_bytes(generate_cohort(tmp_path / "a", n_patients=8, seed=5, size=32).parent)
    b = _all_bytes(generate_cohort(tmp_path / "b", n_patients=8, seed=5, size=32).parent)
    c = _all_bytes(generate_cohort(tmp_path / "c", n_patients=8, seed=6, size=32).parent)
    assert "manifest.csv" in a and any(k.startswith("images") for k in a)
    assert a == b
    shared = set(a) & set(c)
    assert any(a[k] != c[k] for k in shared if k.startswith("images")) or set(a) != set(c)


def test_workers_do_not_change_the_output(tmp_path: Path) -> None:
    one = generate_cohort(tmp_path / "one", n_patients=4, seed=1, size=32, workers=1).parent
    two = generate_cohort(tmp_path / "two", n_patients=4, seed=1, size=32, workers=2).parent
    assert _all_bytes(one) == _all_bytes(two)


def test_proportions_and_columns_on_a_medium_cohort(medium: Path) -> None:
    rows = _rows(medium)
    labels = {r["patient_id"]: r["label"] for r in rows}
    n = len(labels)
    assert n == 200
    assert all(re.fullmatch(r"P\d{4}", pid) for pid in labels)
    assert sum(v == "malignant" for v in labels.values()) == round(200 * 205 / 790)
    dm = [r for r in rows if r["modality"] == "DM"]
    us = [r for r in rows if r["modality"] == "US"]
    assert 2.5 <= len(dm) / n <= 3.1  # study: 2.83
    assert 1.5 <= len(us) / n <= 1.9  # study: 1.71
    mods: dict[str, set[str]] = {}
    for r in rows:
        mods.setdefault(r["patient_id"], set()).add(r["modality"])
    single = sum(len(m) == 1 for m in mods.values())
    assert 1 <= single <= 0.1 * n
    assert {r["view"] for r in dm} == {"CC", "MLO"} and {r["view"] for r in us} == {""}
    assert {r["laterality"] for r in rows} == {"L", "R"}
    assert all(r["box_x0"] == "" for r in dm)  # documented: DM boxes live in image_truth.csv
    assert all((medium.parent / r["path"]).is_file() for r in rows)
    assert all(r["path"].startswith("images/") for r in rows)


def test_latent_truth_has_designed_complementarity(medium: Path) -> None:
    truth = _rows(medium.parent / "cohort_truth.csv")
    assert len(truth) == 200
    mal = [t for t in truth if t["label"] == "malignant"]
    ben = [t for t in truth if t["label"] == "benign"]
    modes = {m: sum(t["evidence"] == m for t in mal) for m in ("both", "dm", "us")}
    assert all(v > 0 for v in modes.values()), modes  # each modality alone misses some cancers
    assert any(t["dm_mimic"] == "1" for t in ben) and any(t["us_mimic"] == "1" for t in ben)
    assert all(t["evidence"] == "none" for t in ben)
    # evidence means a more suspicious-looking lesion in that modality
    ev = [float(t["dm_suspicion"]) for t in mal if t["dm_evidence"] == "1"]
    plain = [float(t["dm_suspicion"]) for t in ben if t["dm_mimic"] == "0"]
    assert min(ev) > max(plain)


def test_every_us_row_has_a_box_inside_its_image(medium: Path) -> None:
    us = [r for r in _rows(medium) if r["modality"] == "US"]
    assert us
    for r in us:
        x0, y0, x1, y1 = (int(r[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
        w, h = Image.open(medium.parent / r["path"]).size
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, r


def test_default_size_cohort_mixes_formats_and_sizes(tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    manifest = generate_cohort(tmp_path / "c", n_patients=16, seed=0)
    rows = _rows(manifest)
    paths = [manifest.parent / r["path"] for r in rows]
    dcm = [p for p in paths if p.suffix == ".dcm"]
    assert dcm and all(p.read_bytes()[128:132] == b"DICM" for p in dcm)
    ds = pydicom.dcmread(dcm[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.pixel_array.dtype == np.uint16
    assert "RescaleSlope" in ds and "RescaleIntercept" in ds
    modes = {p: Image.open(p).mode for p in paths if p.suffix == ".png"}
    assert any(m.startswith("I") for m in modes.values())  # 16-bit grey
    assert any(m == "RGB" for m in modes.values()) and any(m == "L" for m in modes.values())
    sizes = {Image.open(p).size for p in paths if p.suffix == ".png"}
    assert len(sizes) > 5 and all(120 < min(s) and max(s) < 340 for s in sizes)
    dm_sizes = [
        Image.open(p).size
        for p, r in zip(paths, rows, strict=True)
        if r["modality"] == "DM" and p.suffix == ".png"
    ]
    assert all(w < h for w, h in dm_sizes)  # mammograms are portrait, not square


def _core_and_ring(img: np.ndarray, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """Mean of the box's central half and of the band around the box (inside the image)."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    core = img[y0 + bh // 4 : y1 - bh // 4, x0 + bw // 4 : x1 - bw // 4]
    ring = img[max(0, y0 - bh // 2) : y1 + bh // 2, max(0, x0 - bw // 2) : x1 + bw // 2].copy()
    ring[
        y0 - max(0, y0 - bh // 2) : y1 - max(0, y0 - bh // 2),
        x0 - max(0, x0 - bw // 2) : x1 - max(0, x0 - bw // 2),
    ] = np.nan
    ring = ring[np.isfinite(ring) & (ring > 0)]
    return float(core.mean()), float(ring.mean())


def test_lesions_are_really_in_the_images(synthetic_cohort: Path) -> None:
    """The US box holds a hypoechoic lesion; a DM finding box holds a dense (suspicious) or a
    fat-containing, low-density (textbook benign) mass."""
    root = synthetic_cohort.parent
    truth = {t["patient_id"]: t for t in _rows(root / "cohort_truth.csv")}
    counts = {"us": [0, 0], "dense": [0, 0], "fatty": [0, 0]}  # [images, as expected]
    for r in _rows(root / "image_truth.csv"):
        if r["lesion_visible"] != "1":
            continue
        box = tuple(int(r[k]) for k in ("lesion_x0", "lesion_y0", "lesion_x1", "lesion_y1"))
        core, ring = _core_and_ring(_grey(root / r["path"]), box)
        t = truth[r["patient_id"]]
        if r["modality"] == "US":
            counts["us"][0] += 1
            counts["us"][1] += core < 0.7 * ring
        elif t["dm_finding"] == "mass" and float(t["dm_suspicion"]) >= 0.6:
            counts["dense"][0] += 1
            counts["dense"][1] += core > ring
        elif t["dm_finding"] == "mass" and float(t["dm_suspicion"]) <= 0.15:
            counts["fatty"][0] += 1
            counts["fatty"][1] += core < ring
    assert counts["us"][0] > 20 and counts["us"][1] >= 0.95 * counts["us"][0], counts
    for kind in ("dense", "fatty"):
        assert counts[kind][0] >= 4 and counts[kind][1] >= 0.9 * counts[kind][0], counts


def test_shared_fixture_is_big_enough_for_folds_and_holdout(synthetic_cohort: Path) -> None:
    rows = _rows(synthetic_cohort)
    labels = {r["patient_id"]: r["label"] for r in rows}
    assert len(labels) == 40 and sum(v == "malignant" for v in labels.values()) >= 10
    suffixes = {Path(r["path"]).suffix for r in rows}
    assert suffixes == {".png", ".dcm"}


def test_difficulty_changes_the_latent_mix() -> None:
    easy = plan_cohort(400, 0, PRESETS["easy"])
    hard = plan_cohort(400, 0, PRESETS["hard"])

    def count(plans: list, attr: str, value: object) -> int:
        return sum(getattr(p, attr) == value for p in plans)

    assert count(easy, "evidence", "both") > count(hard, "evidence", "both")
    assert count(easy, "dm_mimic", True) < count(hard, "dm_mimic", True)


def test_bad_arguments_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^data\.synthetic\.patients must be at least 1"):
        generate_cohort(tmp_path / "x", n_patients=0)
    with pytest.raises(UserError, match=r"^data\.synthetic\.size must be at least 24"):
        generate_cohort(tmp_path / "x", n_patients=2, size=8)
    assert not (tmp_path / "x").exists()  # nothing written before the arguments are checked
    with pytest.raises(UserError, match="difficulty.*'impossible'.*easy, standard, hard"):
        generate_cohort(tmp_path / "x", n_patients=2, difficulty="impossible")
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "mine.png").write_bytes(b"not ours")
    with pytest.raises(UserError, match="not a synthetic cohort"):
        generate_cohort(foreign, n_patients=2, size=32)
    assert (foreign / "images" / "mine.png").exists()


def test_interrupted_run_leaves_no_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "c"
    generate_cohort(out, n_patients=3, size=32)
    calls = []

    def boom(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = writer.render_patient
    monkeypatch.setattr(writer, "render_patient", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(out, n_patients=5, size=32, workers=1)
    assert not (out / "manifest.csv").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".synth-")]
    monkeypatch.undo()
    manifest = generate_cohort(out, n_patients=5, size=32)  # a rerun recovers
    assert len({r["patient_id"] for r in _rows(manifest)}) == 5
    listed = {Path(r["path"]).name for r in _rows(manifest)}
    assert listed == {p.name for p in (out / "images").iterdir()}  # no stale images


def test_cli_writes_manifest_and_summary(tmp_path: Path) -> None:
    from click.testing import CliRunner

    out = tmp_path / "cli"
    res = CliRunner().invoke(
        synth_command, ["--out", str(out), "--patients", "6", "--size", "32", "--seed", "2"]
    )
    assert res.exit_code == 0, res.output
    assert (out / "manifest.csv").is_file()
    assert "6 patients" in res.output and "DM" in res.output and " s." in res.output


def test_cli_is_registered_and_reports_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from breastfusion.cli import main

    assert main(["synth", "--out", str(tmp_path / "d"), "--patients", "2", "--size", "32"]) == 0
    assert (tmp_path / "d" / "manifest.csv").is_file()
    assert main(["synth", "--out", str(tmp_path / "e"), "--patients", "0"]) == 2
    assert "error: --patients must be at least 1" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "e"), "--size", "8"]) == 2
    assert "error: --size must be at least 24 px" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("n_patients", [160, 200])
def test_cohort_sizes_that_once_crashed_render(tmp_path, n_patients):
    """Tall US lesions in shallow sectors used to make the lesion depth range empty."""
    from breastfusion.data.synthetic import generate_cohort

    manifest = generate_cohort(tmp_path, n_patients=n_patients, seed=0, size=32, workers=1)
    assert manifest.is_file()


# --- no shortcuts, designed evidence ---------------------------------------------------------

BAND = (0.35, 0.65)  # chance band for 300 patients (78 malignant): ~4 standard deviations


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 patients (the size the shortcut bar is set for) at 32 px: ~4 s of CPU."""
    return generate_cohort(tmp_path_factory.mktemp("audit"), n_patients=300, seed=0, size=32)


def test_no_non_evidence_feature_predicts_the_label(audit: Path) -> None:
    """Images per patient, lesion-free share, formats, file and image sizes: all at chance."""
    from breastfusion.data.synthetic.audit import NON_EVIDENCE, feature_aucs, shortcut_features

    feats = shortcut_features(audit)
    assert len(feats) == 300 and feats["y"].sum() == 78
    aucs = feature_aucs(feats)
    assert set(aucs) == set(NON_EVIDENCE)
    outside = {k: v for k, v in aucs.items() if v is None or not BAND[0] <= v <= BAND[1]}
    assert not outside, outside


def test_the_audit_catches_a_shortcut(audit: Path) -> None:
    """The audit can fail: drop the US images of half the benign patients, and the US count
    becomes a shortcut it flags."""
    from breastfusion.data.synthetic.audit import feature_aucs, shortcut_features

    feats = shortcut_features(audit)
    benign = feats.index[feats["y"] == 0]
    feats.loc[benign[::2], "n_us"] = 0
    assert feature_aucs(feats)["n_us"] > BAND[1]


def test_lesion_free_views_and_benign_lesions_occur_alike_in_both_classes(audit: Path) -> None:
    images = _rows(audit.parent / "image_truth.csv")
    label = {r["patient_id"]: r["label"] for r in _rows(audit)}
    share, with_lesion = {}, {}
    for cls in ("benign", "malignant"):
        dm = [r for r in images if r["modality"] == "DM" and label[r["patient_id"]] == cls]
        share[cls] = sum(r["lesion_visible"] == "0" for r in dm) / len(dm)
        patients = {p for p, lab in label.items() if lab == cls}
        seen = {r["patient_id"] for r in images if r["lesion_visible"] == "1"}
        with_lesion[cls] = len(patients & seen) / len(patients)
    # contralateral views (and density-masked masses) in both classes, at the same rate
    assert all(0.2 <= v <= 0.45 for v in share.values()), share
    assert abs(share["benign"] - share["malignant"]) < 0.06, share
    # every benign patient has a lesion to look at, as every malignant one does
    assert all(v >= 0.95 for v in with_lesion.values()), with_lesion
    assert {r["lesion_visible"] for r in images if r["modality"] == "US"} == {"1"}


def test_counts_and_findings_do_not_depend_on_the_label() -> None:
    """On 3000 planned patients (no pixels): the same image counts, views and finding kinds."""
    plans = plan_cohort(3000, 0, PRESETS["standard"])
    by_class: dict[bool, list] = {True: [], False: []}
    for p in plans:
        by_class[p.malignant].append(p)

    def mean(cls: bool, f) -> float:
        return float(np.mean([f(p) for p in by_class[cls]]))

    for f in (
        lambda p: sum(im.modality == "DM" for im in p.images),
        lambda p: sum(im.modality == "US" for im in p.images),
        lambda p: sum(im.modality == "DM" and not im.has_lesion for im in p.images),
        lambda p: p.dm_finding == "calc",
        lambda p: p.dm_finding == "mass+calc",
        lambda p: p.dm_masked,
        lambda p: p.density,
    ):
        assert abs(mean(True, f) - mean(False, f)) < 0.1 * max(1.0, mean(False, f))


def _latent_aucs(difficulty: str) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    plans = plan_cohort(4000, 1, PRESETS[difficulty])
    y = np.array([p.malignant for p in plans])
    dm, us = np.array([p.dm_s for p in plans]), np.array([p.us_s for p in plans])
    return {
        "dm": roc_auc_score(y, dm),
        "us": roc_auc_score(y, us),
        "both": roc_auc_score(y, np.maximum(dm, us)),
    }


def test_evidence_ceiling_per_modality_and_together() -> None:
    """Each modality alone is imperfect (0.85-0.95); together they separate almost all."""
    std = _latent_aucs("standard")
    assert 0.85 <= std["dm"] <= 0.95 and 0.85 <= std["us"] <= 0.95, std
    assert std["both"] >= 0.96 and std["both"] >= max(std["dm"], std["us"]) + 0.03, std
    easy, hard = _latent_aucs("easy"), _latent_aucs("hard")
    assert easy["both"] > std["both"] > hard["both"], (easy, std, hard)
    assert easy["dm"] > std["dm"] > hard["dm"] and easy["us"] > std["us"] > hard["us"]


def test_rendered_lesions_follow_their_suspicion(audit: Path) -> None:
    """Suspicious US lesions are taller than wide; suspicious DM masses spread (spicules)."""
    from scipy.stats import spearmanr

    truth = {t["patient_id"]: t for t in _rows(audit.parent / "cohort_truth.csv")}
    aspect: dict[str, list[float]] = {}
    extent: dict[str, list[float]] = {}
    for r in _rows(audit.parent / "image_truth.csv"):
        if r["lesion_visible"] != "1":
            continue
        w = int(r["lesion_x1"]) - int(r["lesion_x0"])
        h = int(r["lesion_y1"]) - int(r["lesion_y0"])
        if r["modality"] == "US":
            aspect.setdefault(r["patient_id"], []).append(h / w)
        elif truth[r["patient_id"]]["dm_finding"] == "mass":
            extent.setdefault(r["patient_id"], []).append((w * h) ** 0.5 / int(r["height"]))
    for values, key in ((aspect, "us_suspicion"), (extent, "dm_suspicion")):
        ids = sorted(values)
        rho = spearmanr(
            [np.mean(values[p]) for p in ids], [float(truth[p][key]) for p in ids]
        ).statistic
        assert len(ids) > 100 and rho > 0.6, (key, rho)


@pytest.mark.slow
def test_shortcut_baseline_at_the_demo_size(tmp_path: Path, capsys) -> None:
    """The benchmark itself (300 patients, 128 px): no shortcut, evidence above chance."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shortcut_baseline.py"
    spec = importlib.util.spec_from_file_location("shortcut_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path / "c")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(BAND[0] <= v <= BAND[1] for v in res["non_evidence_auc"].values()), res
    ev = res["evidence_auc"]
    assert 0.85 <= ev["evidence_dm"] <= 0.96 and 0.85 <= ev["evidence_us"] <= 0.95, ev
    assert ev["evidence_logistic"] >= 0.96, ev
