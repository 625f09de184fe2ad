"""Report figures as PNG bytes (matplotlib Agg): ROC with bootstrap bands and operating
points, confusion matrices, fold comparison, reliability. The only module that imports
matplotlib. Each function takes plain arrays/records, so the study runner
or a notebook can call it without a study folder. No torch.

PNG bytes are stable for the same inputs (no creation date in the metadata), which keeps a
re-rendered report byte-identical when nothing changed.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from breastfusion.evaluate import stats as S

DPI = 100
_FPR_GRID = np.linspace(0.0, 1.0, 101)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _txt(text: Any) -> str:
    """Data as literal figure text: a ``$`` would otherwise start matplotlib mathtext."""
    return str(text).replace("$", r"\$")


def to_png(fig: Any) -> bytes:
    """Render and close a figure; the PNG carries no timestamp."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes, mime: str = "image/png") -> str:
    """``data:`` URI of an image, for a self-contained HTML page."""
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


# --------------------------------------------------------------------------------------------
# ROC with a bootstrap band
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RocBand:
    """The ROC curve of one model plus a pointwise 95% band of TPR over an FPR grid."""

    fpr: np.ndarray  # the empirical curve
    tpr: np.ndarray
    grid: np.ndarray  # FPR grid of the band
    tpr_low: np.ndarray
    tpr_high: np.ndarray
    auc: float
    auc_low: float
    auc_high: float
    n_patients: int
    n_malignant: int


def _roc_points(
    y_sorted: np.ndarray, w: np.ndarray, last_of_tie: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) rows for weight rows ``w`` (B × n) of patients sorted by descending score."""
    tp = np.cumsum(w * y_sorted, axis=1)[:, last_of_tie]
    fp = np.cumsum(w * (1 - y_sorted), axis=1)[:, last_of_tie]
    tp = np.hstack([np.zeros((len(w), 1)), tp])
    fp = np.hstack([np.zeros((len(w), 1)), fp])
    return fp / fp[:, -1:], tp / tp[:, -1:]


def roc_band(
    y: np.ndarray, s: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> RocBand:
    """Empirical ROC and a pointwise percentile band from the stratified patient bootstrap.

    The same resampling scheme (patients within each class, class sizes fixed) as the AUC
    intervals in ``evaluate``, so band and AUC CI tell one story (the study's Fig. 7 shape).
    """
    y = np.asarray(y).astype(int)
    s = np.asarray(s, dtype=float)
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    # Patients with equal scores move together: keep the last index of each tie group.
    last_of_tie = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True])
    fpr, tpr = _roc_points(ys.astype(float), np.ones((1, len(y))), last_of_tie)
    counts = S.stratified_counts(y, n_boot, seed)
    w = np.zeros((counts.n_boot, len(y)))
    w[:, counts.pos_index] = counts.pos_counts
    w[:, counts.neg_index] = counts.neg_counts
    bf, bt = _roc_points(ys.astype(float), w[:, order], last_of_tie)
    # Step-wise "best TPR reachable at FPR <= x" per resample, then percentiles per grid point.
    banded = np.empty((len(bf), len(_FPR_GRID)))
    for i in range(len(bf)):
        idx = np.searchsorted(bf[i], _FPR_GRID, side="right") - 1
        banded[i] = bt[i][idx]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(banded, [alpha, 1 - alpha], axis=0)
    auc_reps = S.bootstrap_auc(y, s, counts=counts)
    a_lo, a_hi = S.percentile_ci(auc_reps, level)
    from breastfusion.evaluate.metrics import roc_auc

    return RocBand(
        fpr=fpr[0],
        tpr=tpr[0],
        grid=_FPR_GRID.copy(),
        tpr_low=lo,
        tpr_high=hi,
        auc=roc_auc(y, s),
        auc_low=a_lo,
        auc_high=a_hi,
        n_patients=len(y),
        n_malignant=int(y.sum()),
    )


def roc_figure(
    bands: Mapping[str, RocBand],
    title: str,
    auc_labels: Mapping[str, tuple[float, float, float]] | None = None,
    points: Mapping[str, tuple[float, float, str]] | None = None,
) -> bytes:
    """One panel per model (bands never merge into one block): the ROC curve, its light
    bootstrap band and, from ``points[name] = (1 - specificity, sensitivity, label)``, the
    operating point. ``auc_labels[name] = (auc, low, high)`` replaces the panel's AUC
    interval (e.g. the one a table reports from more resamples)."""
    plt = _plt()
    auc_labels, points = auc_labels or {}, points or {}
    n = max(1, len(bands))
    fig, axes = plt.subplots(
        1, n, figsize=(3.5 * n + 0.3, 4.2), dpi=DPI, squeeze=False, layout="constrained"
    )
    for i, (ax, (name, b)) in enumerate(zip(axes[0], bands.items(), strict=False)):
        color = f"C{i}"
        auc, lo, hi = auc_labels.get(name, (b.auc, b.auc_low, b.auc_high))
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.fill_between(b.grid, b.tpr_low, b.tpr_high, step="post", color=color, alpha=0.12, lw=0)
        ax.plot(b.fpr, b.tpr, color=color, lw=1.8)
        if name in points:
            x, y, label = points[name]
            ax.plot([x], [y], marker="o", ms=7, mfc="white", mec="black", mew=1.5, ls="none")
            ax.annotate(
                _txt(label), (x, y), xytext=(8, -14), textcoords="offset points", fontsize=7
            )
        ax.set_title(f"{_txt(name)}\nAUC {auc:.3f} ({lo:.3f}–{hi:.3f})", fontsize=9)
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity")
        ax.set_aspect("equal")
        ax.grid(alpha=0.25)
    axes[0][0].set_ylabel("sensitivity")
    fig.suptitle(f"{_txt(title)} (shaded: pointwise 95% bootstrap band; o: operating point)",
                 fontsize=9)  # fmt: skip
    return to_png(fig)


# --------------------------------------------------------------------------------------------
# Confusion matrices
# --------------------------------------------------------------------------------------------


def confusion_figure(matrices: Mapping[str, Mapping[str, Any]], title: str) -> bytes:
    """Row-normalised 2×2 matrices (rows = true class), counts in brackets (Fig. 8).

    ``matrices[name]`` holds ``tp, fp, tn, fn`` and ``threshold``.
    """
    plt = _plt()
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n + 0.4, 3.4), dpi=DPI, squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items(), strict=True):
        counts = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]], dtype=float)
        rows = counts.sum(axis=1, keepdims=True)
        norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}\n({int(counts[i, j])})",
                    ha="center",
                    va="center",
                    color="white" if norm[i, j] > 0.6 else "black",
                    fontsize=10,
                )
        ax.set_xticks([0, 1], ["benign", "malignant"])
        ax.set_yticks([0, 1], ["benign", "malignant"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{_txt(name)}\nthreshold {m['threshold']:.3g}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)


# --------------------------------------------------------------------------------------------
# Fold comparison
# --------------------------------------------------------------------------------------------


def fold_figure(rows: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """Per-fold validation AUC of each configuration (dots), mean ± SD (bar).

    ``rows``: ``label``, ``fold_aucs`` ({"fold0": auc, ...}), ``mean_auc``, ``std_auc``.
    """
    plt = _plt()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(9.0, 1.4 + 0.42 * n), dpi=DPI)
    folds = sorted({k for r in rows for k in r["fold_aucs"]}, key=lambda k: int(k[4:]))
    markers = "osD^vP*X<>"
    for i, r in enumerate(rows):
        yy = n - 1 - i
        mean, sd = r["mean_auc"], r["std_auc"]
        if mean is not None and math.isfinite(mean):
            err = sd if sd is not None and math.isfinite(sd) else 0.0
            ax.errorbar(mean, yy, xerr=err, fmt="|", color="black", ms=14, capsize=3, zorder=3)
        for j, k in enumerate(folds):
            v = r["fold_aucs"].get(k)
            if v is not None and math.isfinite(v):
                ax.scatter(
                    v,
                    yy + (j - (len(folds) - 1) / 2) * 0.08,
                    marker=markers[j % len(markers)],
                    color=f"C{j}",
                    s=22,
                    label=k if i == 0 else None,
                    zorder=2,
                )
    ax.set_yticks(range(n), [_txt(r["label"]) for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("patient-level validation AUC")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if folds:
        ax.legend(
            fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="fold", title_fontsize=7
        )
    fig.tight_layout()
    return to_png(fig)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def calibration_figure(curves: Mapping[str, Mapping[str, Any]], title: str) -> bytes:
    """Reliability diagram on malignancy probabilities; ``curves[name]`` has
    ``mean_predicted``, ``fraction_positive``, ``count`` (as ``metrics.reliability_curve``),
    ``brier`` and optionally ``slope``/``intercept`` (logistic recalibration)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 6.0), dpi=DPI)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    for i, (name, c) in enumerate(curves.items()):
        sizes = 12 + 60 * np.sqrt(np.asarray(c["count"], dtype=float) / max(1, max(c["count"])))
        ax.plot(c["mean_predicted"], c["fraction_positive"], color=f"C{i}", lw=1.4)
        label = f"{_txt(name)} (Brier {c['brier']:.3f}"
        if c.get("slope") is not None and math.isfinite(c["slope"]):
            label += f", slope {c['slope']:.3g}, intercept {c['intercept']:.3g}"
        ax.scatter(
            c["mean_predicted"],
            c["fraction_positive"],
            s=sizes,
            color=f"C{i}",
            label=label + ")",
            zorder=3,
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="mean predicted malignancy probability (10 bins)",
        ylabel="observed fraction malignant",
        title=_txt(title),
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=7, ncol=1)
    ax.set_aspect("equal")
    fig.tight_layout()
    return to_png(fig)


def plot_reliability(result: Mapping[str, Any], path: Any) -> Any:
    """``reliability.png`` of an evaluation (``metrics.json``): every model's reliability
    curve, Brier score and calibration slope/intercept; written atomically."""
    from breastfusion.io import atomic_write_bytes

    curves = {}
    for name, e in (result.get("models") or {}).items():
        r, cal = e.get("reliability") or {}, e.get("calibration") or {}
        curves[name] = {
            "mean_predicted": r.get("mean_predicted") or [],
            "fraction_positive": r.get("fraction_positive") or [],
            "count": r.get("count") or [1],
            "brier": (e.get("brier") or {}).get("value") or math.nan,
            "slope": cal.get("slope"),
            "intercept": cal.get("intercept"),
        }
    return atomic_write_bytes(path, calibration_figure(curves, "Reliability (patients)"))
