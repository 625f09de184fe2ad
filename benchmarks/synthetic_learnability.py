"""Can a small CNN learn the synthetic cohort's designed evidence at the demo's scale?

A probe, independent of the training engine: ResNet-18 from random init (torchvision), one
grey channel replicated to three with the ImageNet normalisation, Adam, class-weighted loss,
random flips; DM whole images and US crops around the manifest lesion box (+10 % margin),
min-max normalised, padded to square and shrunk to ``--size`` px exactly as the platform's
preprocessing does. It trains on one cohort (``--patients``, seed ``--seed``) and scores a
*separate* test cohort (``--test-patients``, seed + 100), so the AUCs are not dominated by a
40-patient holdout's noise. Patient scores are the mean over a patient's images (pairs for
the fusion); test patients with both modalities are scored.

Printed per model: patient AUC (DM only, US only, the mean of their scores -- "late" fusion --
and, unless ``--fusion-epochs 0``, a jointly trained sum-fusion of two ResNet-18 branches),
the AUC per evidence mode (malignant patients whose evidence shows in both modalities, DM only
or US only, against all benign) and the latent-suspicion ceiling of the same patients. The
last line is a JSON object with every number.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synthetic_learnability.py          # ~5 min
    .venv/bin/python benchmarks/synthetic_learnability.py --epochs 3 --fusion-epochs 0

On shared cores ``OMP_NUM_THREADS=1`` is several times faster than 2 threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import numpy as np  # noqa: E402  (after the path set-up above)
import pandas as pd  # noqa: E402

T0 = time.perf_counter()


def say(line: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {line}", flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patients", type=int, default=160, help="training cohort (the demo's ~dev)")
    p.add_argument("--test-patients", type=int, default=300, help="separate test cohort")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (test cohort: seed + 100)")
    p.add_argument("--source-size", type=int, default=128, help="generated image size, px")
    p.add_argument("--size", type=int, default=48, help="model input side, px")
    p.add_argument("--difficulty", default="standard")
    p.add_argument("--epochs", type=int, default=3, help="single-modality epochs")
    p.add_argument("--fusion-epochs", type=int, default=2, help="0: no joint fusion model")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="cohort folder (default: temporary)")
    return p.parse_args(argv)


def load_images(df: pd.DataFrame, size: int) -> dict[str, np.ndarray]:
    """Preprocessed uint8 squares by absolute path: DM whole, US cropped to its box."""
    from breastfusion.data.imaging import minmax, read_grey
    from breastfusion.data.preprocess import PreprocessSpec, preprocess
    from breastfusion.roi.crop import expand_box

    spec = PreprocessSpec(size=size)
    out = {}
    for r in df.itertuples():
        raw = read_grey(r.abs_path)
        if r.modality == "US":
            h, w = raw.shape
            box = [float(getattr(r, k)) for k in ("box_x0", "box_y0", "box_x1", "box_y1")]
            x0, y0, x1, y1 = expand_box(box, w, h, 0.1)
            raw = raw[y0:y1, x0:x1]
        out[r.abs_path] = preprocess(minmax(raw), spec)
    return out


def cohort(root: Path, n: int, seed: int, a: argparse.Namespace) -> pd.DataFrame:
    from breastfusion.data.synthetic import generate_cohort

    manifest = generate_cohort(
        root, n_patients=n, seed=seed, size=a.source_size, difficulty=a.difficulty
    )
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df["abs_path"] = [str(root / p) for p in df["path"]]
    df["y"] = (df["label"] == "malignant").astype(int)
    return df


class Nets:
    """Model builders and the training loop (torch imported lazily)."""

    def __init__(self, a: argparse.Namespace, images: dict[str, np.ndarray]):
        import torch

        self.torch, self.a, self.images = torch, a, images
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def trunk(self):
        import torch.nn as nn
        import torchvision

        m = torchvision.models.resnet18(num_classes=2)
        m.fc = nn.Identity()
        return m

    def batch(self, paths: list[str], flip_rng: np.random.Generator | None = None):
        x = self.torch.from_numpy(np.stack([self.images[p] for p in paths])).float() / 255
        x = x.unsqueeze(1)
        if flip_rng is not None:
            if flip_rng.random() < 0.5:
                x = x.flip(3)
            if flip_rng.random() < 0.5:
                x = x.flip(2)
        return (x.repeat(1, 3, 1, 1) - self.mean) / self.std

    def fit(self, params, forward, items: list, ys: np.ndarray, epochs: int) -> None:
        torch = self.torch
        rng = np.random.default_rng(self.a.train_seed)
        opt = torch.optim.Adam(params, lr=self.a.lr)
        weight = torch.tensor([1.0, float((ys == 0).sum() / max(1, (ys == 1).sum()))])
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        for epoch in range(epochs):
            order, total = rng.permutation(len(items)), 0.0
            for k in range(0, len(order), self.a.batch):
                idx = order[k : k + self.a.batch]
                loss = loss_fn(forward([items[i] for i in idx], rng), torch.from_numpy(ys[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            say(f"  epoch {epoch + 1}/{epochs}: loss {total / len(items):.3f}")


def single(nets: Nets, train: pd.DataFrame, test: pd.DataFrame, mod: str) -> pd.Series:
    torch = nets.torch
    torch.manual_seed(nets.a.train_seed)
    trunk, head = nets.trunk(), torch.nn.Linear(512, 2)
    tr = train[train["modality"] == mod]
    say(f"{mod}: {len(tr)} training images")

    def forward(paths, rng):
        return head(trunk(nets.batch(paths, rng)))

    trunk.train()
    nets.fit([*trunk.parameters(), *head.parameters()], forward, list(tr["abs_path"]),
             tr["y"].to_numpy(), nets.a.epochs)  # fmt: skip
    trunk.eval()
    te = test[test["modality"] == mod]
    with torch.no_grad():
        probs = [
            torch.softmax(head(trunk(nets.batch(list(te["abs_path"].iloc[k : k + 64])))), 1)
            for k in range(0, len(te), 64)
        ]
    score = torch.cat(probs)[:, 1].numpy()
    return pd.Series(score, index=te["patient_id"].to_numpy()).groupby(level=0).mean()


def _pairs(df: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for pid, g in df.groupby("patient_id"):
        dm = g.loc[g["modality"] == "DM", "abs_path"].tolist()
        us = g.loc[g["modality"] == "US", "abs_path"].tolist()
        if dm and us:
            out[pid] = [(d, u) for d in dm for u in us]
    return out


def fusion(nets: Nets, train: pd.DataFrame, test: pd.DataFrame) -> pd.Series:
    torch = nets.torch
    torch.manual_seed(nets.a.train_seed)
    dm, us, head = nets.trunk(), nets.trunk(), torch.nn.Linear(512, 2)
    label = train.groupby("patient_id")["y"].first()
    items = [(pid, pair) for pid, ps in _pairs(train).items() for pair in ps]
    say(f"fusion: {len(items)} training pairs")

    def forward(batch, rng):
        pairs = [p for _, p in batch]
        flip = np.random.default_rng(int(rng.integers(2**31)))
        return head(
            dm(nets.batch([p[0] for p in pairs], flip)) + us(nets.batch([p[1] for p in pairs], rng))
        )

    dm.train()
    us.train()
    params = [*dm.parameters(), *us.parameters(), *head.parameters()]
    ys = np.array([label[pid] for pid, _ in items])
    nets.fit(params, forward, items, ys, nets.a.fusion_epochs)
    dm.eval()
    us.eval()
    scores = {}
    with torch.no_grad():
        for pid, ps in _pairs(test).items():
            logits = head(dm(nets.batch([p[0] for p in ps])) + us(nets.batch([p[1] for p in ps])))
            scores[pid] = float(torch.softmax(logits, 1)[:, 1].mean())
    return pd.Series(scores)


def evaluate(scores: dict[str, pd.Series], truth: pd.DataFrame) -> dict:
    from sklearn.metrics import roc_auc_score

    ids = sorted(set.intersection(*(set(s.index) for s in scores.values())))
    t = truth.loc[ids]
    y = (t["label"] == "malignant").astype(int).to_numpy()
    res: dict = {"n_patients": len(ids), "n_malignant": int(y.sum()), "auc": {}, "by_mode": {}}
    for name, s in scores.items():
        res["auc"][name] = float(roc_auc_score(y, s.loc[ids]))
    dm_s, us_s = t["dm_suspicion"].to_numpy(), t["us_suspicion"].to_numpy()
    res["ceiling"] = {
        "dm": float(roc_auc_score(y, dm_s)),
        "us": float(roc_auc_score(y, us_s)),
        "max": float(roc_auc_score(y, np.maximum(dm_s, us_s))),
    }
    benign = (t["label"] == "benign").to_numpy()
    for mode in ("both", "dm", "us"):
        sel = benign | ((t["label"] == "malignant") & (t["evidence"] == mode)).to_numpy()
        if (sel & ~benign).any():
            res["by_mode"][mode] = {
                name: float(roc_auc_score(y[sel], s.loc[ids].to_numpy()[sel]))
                for name, s in scores.items()
            }
    return res


def run(a: argparse.Namespace, root: Path) -> dict:

    say(f"cohorts: {a.patients} training and {a.test_patients} test patients, {a.source_size} px")
    train = cohort(root / "train", a.patients, a.seed, a)
    test = cohort(root / "test", a.test_patients, a.seed + 100, a)
    truth = pd.read_csv(root / "test" / "cohort_truth.csv", dtype={"patient_id": str})
    nets = Nets(a, load_images(pd.concat([train, test]), a.size))
    scores = {m: single(nets, train, test, m) for m in ("DM", "US")}
    both = sorted(set(scores["DM"].index) & set(scores["US"].index))
    scores["late"] = (scores["DM"].loc[both] + scores["US"].loc[both]) / 2
    if a.fusion_epochs > 0:
        scores["fusion"] = fusion(nets, train, test)
    res = evaluate(scores, truth.set_index("patient_id"))
    res["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    res["seconds"] = time.perf_counter() - T0
    return res


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.out is None:
        with tempfile.TemporaryDirectory(prefix="bf-learn-") as tmp:
            res = run(a, Path(tmp))
    else:
        res = run(a, a.out)
    print(
        f"\ntest patients with both modalities: {res['n_patients']} ({res['n_malignant']} malignant)"
    )
    print("patient AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in res["auc"].items()))
    print(
        "ceiling (latent suspicion): "
        + ", ".join(f"{k} {v:.3f}" for k, v in res["ceiling"].items())
    )
    for mode, aucs in res["by_mode"].items():
        print(f"malignant with evidence in {mode} vs all benign: "
              + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))  # fmt: skip
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
