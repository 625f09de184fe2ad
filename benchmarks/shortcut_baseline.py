"""Shortcut baseline of the synthetic cohort: what a model could learn *without* the evidence.

Generates a cohort (default 300 patients, seed 0, 128 px, difficulty standard) and prints the
patient-level AUC against the label of every non-evidence feature -- images per patient (DM,
US, total), the share of lesion-free views, the file-format mix, the mean file size and the
mean image size -- and of the hidden evidence in ``cohort_truth.csv`` (each modality's latent
suspicion, their max, and a cross-validated logistic combination): the ceiling a model is
read against. A feature with AUC near 0.5 carries no label information; one far from 0.5
(either way: 0.1 is as informative as 0.9) is a shortcut a model could take instead of the
evidence. The last line is a JSON object with every number.

    .venv/bin/python benchmarks/shortcut_baseline.py
    .venv/bin/python benchmarks/shortcut_baseline.py --patients 790 --size 256 --difficulty hard

With 300 patients (78 malignant) an uninformative feature's AUC has a standard deviation of
about 0.04, so values inside 0.35-0.65 are what chance gives (the tests require that band).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

BAND = (0.35, 0.65)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patients", type=int, default=300, help="cohort size")
    p.add_argument("--seed", type=int, default=0, help="cohort seed")
    p.add_argument("--size", type=int, default=128, help="nominal generated image size, px")
    p.add_argument("--difficulty", default="standard", help="easy | standard | hard")
    p.add_argument(
        "--out", type=Path, default=None, help="cohort folder (kept); default: a temporary one"
    )
    return p.parse_args(argv)


def run(a: argparse.Namespace, out: Path) -> dict:
    from breastfusion.data.synthetic import generate_cohort
    from breastfusion.data.synthetic.audit import evidence_aucs, feature_aucs, shortcut_features

    t0 = time.perf_counter()
    manifest = generate_cohort(
        out, n_patients=a.patients, seed=a.seed, size=a.size, difficulty=a.difficulty
    )
    seconds = time.perf_counter() - t0
    feats = shortcut_features(manifest)
    return {
        "patients": int(len(feats)),
        "malignant": int(feats["y"].sum()),
        "seed": a.seed,
        "size": a.size,
        "difficulty": a.difficulty,
        "generate_seconds": seconds,
        "non_evidence_auc": feature_aucs(feats),
        "evidence_auc": evidence_aucs(manifest.parent / "cohort_truth.csv", seed=a.seed),
        "band": list(BAND),
    }


def report(res: dict) -> list[str]:
    lines = [
        f"cohort: {res['patients']} patients ({res['malignant']} malignant), seed {res['seed']}, "
        f"{res['size']} px, difficulty {res['difficulty']} ({res['generate_seconds']:.1f} s)",
        f"non-evidence features (AUC against the label; chance band {BAND[0]:.2f}-{BAND[1]:.2f}):",
    ]
    outside = []
    for name, value in res["non_evidence_auc"].items():
        flag = ""
        if value is not None and not BAND[0] <= value <= BAND[1]:
            flag = "  <-- shortcut"
            outside.append(name)
        shown = "n/a (one value only)" if value is None else f"{value:.3f}"
        lines.append(f"  {name:24s} {shown}{flag}")
    lines.append("hidden evidence (cohort_truth.csv; the ceiling a model is read against):")
    for name, value in res["evidence_auc"].items():
        lines.append(f"  {name:24s} {'n/a' if value is None else f'{value:.3f}'}")
    lines.append(
        "verdict: "
        + (f"shortcuts in {', '.join(outside)}" if outside else "no non-evidence shortcut")
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.out is None:
        with tempfile.TemporaryDirectory(prefix="bf-shortcut-") as tmp:
            res = run(a, Path(tmp) / "cohort")
    else:
        res = run(a, a.out)
    for line in report(res):
        print(line)
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
