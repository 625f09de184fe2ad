"""Grad-CAM per branch: the pytorch-grad-cam wrapper against a hand-written Grad-CAM."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from breastfusion.errors import UserError
from breastfusion.explain import gradcam as G
from breastfusion.models.fusion import build_model

SIZES = {"dm": 64, "us": 96}  # layer4 maps of 2×2 and 3×3: the upsampling is exercised


def hand_gradcam(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], branch: str
) -> np.ndarray:
    """Grad-CAM from its definition: d(malignant logit)/d(activations) of the target layer,
    channel weights = spatial mean of the gradients, ReLU of the weighted sum of activations,
    min-max scaled per image and upsampled (bilinear) to the branch's input size."""
    layer = model.gradcam_target_layer(branch)
    saved: dict[str, torch.Tensor] = {}

    def hook(_module, _inp, out):
        out.register_hook(lambda g: saved.__setitem__("grad", g))
        saved["act"] = out

    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        model.zero_grad()
        args = [
            inputs[name].clone().requires_grad_(name == branch) for name in G.input_names(model)
        ]
        logits = model(*args)
        logits[:, 1].sum().backward()
    finally:
        handle.remove()
    act, grad = saved["act"].detach(), saved["grad"].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    size = tuple(inputs[branch].shape[-2:])
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    # Min-max per image to [0, 1] (after upsampling: bilinear interpolation rarely lands on the
    # coarse map's extremes, so scaling before would leave the maximum below 1).
    lo = cam.flatten(1).min(dim=1).values[:, None, None]
    hi = cam.flatten(1).max(dim=1).values[:, None, None]
    return ((cam - lo) / (hi - lo + 1e-7)).numpy()


@pytest.fixture(scope="module")
def fusion_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fusion").eval()


def _inputs(sizes: dict[str, int], batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {b: torch.rand(batch, 1, s, s, generator=gen) for b, s in sizes.items()}


@pytest.mark.parametrize("branch", ["dm", "us"])
def test_fusion_map_equals_hand_written_gradcam(fusion_model, branch):
    inputs = _inputs(SIZES)
    maps = G.gradcam_maps(fusion_model, inputs)
    expected = hand_gradcam(fusion_model, inputs, branch)
    got = maps[branch]
    assert got.shape == (2, SIZES[branch], SIZES[branch])
    assert expected.max() > 0.9  # a real map, not an all-zero one that trivially matches
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_single_modal_map_equals_hand_written_gradcam():
    torch.manual_seed(0)
    model = build_model("us").eval()
    inputs = _inputs({"us": 96})
    maps = G.gradcam_maps(model, inputs)
    assert list(maps) == ["us"]
    expected = hand_gradcam(model, inputs, "us")
    assert expected.max() > 0.9
    np.testing.assert_allclose(maps["us"], expected, atol=1e-4)


def test_branches_give_different_maps(fusion_model):
    inputs = _inputs({"dm": 96, "us": 96})
    maps = G.gradcam_maps(fusion_model, inputs)
    assert maps["dm"].shape == maps["us"].shape
    assert np.abs(maps["dm"] - maps["us"]).max() > 0.1
    # Each branch's map follows its own image: changing the US input leaves the DM map's
    # *inputs* alone but changes the US map.
    other = dict(inputs, us=torch.rand_like(inputs["us"]))
    maps2 = G.gradcam_maps(fusion_model, other, branches=["us"])
    assert np.abs(maps2["us"] - maps["us"]).max() > 0.1


def test_wrapper_holds_the_other_input_fixed(fusion_model):
    inputs = _inputs(SIZES, batch=1)
    wrapper = G.BranchInput(fusion_model, "us", inputs)
    with torch.no_grad():
        assert torch.equal(wrapper(inputs["us"]), fusion_model(inputs["dm"], inputs["us"]))
    with pytest.raises(UserError, match="no branch 'cc'"):
        G.BranchInput(fusion_model, "cc", inputs)


def test_select_cases_picks_the_most_telling_per_category():
    df = pd.DataFrame(
        {
            "patient_id": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "y_true": [1, 1, 1, 1, 0, 0, 0, 0],
            "y_score": [0.9, 0.7, 0.3, 0.1, 0.8, 0.6, 0.2, 0.55],
        }
    )
    picked = G.select_cases(df, threshold=0.5, n=1)
    got = dict(zip(picked["category"], picked["patient_id"], strict=True))
    assert got == {"true_positive": "a", "false_negative": "d", "false_positive": "e"}
    every = G.select_cases(df, threshold=0.5, n=10)
    assert every["category"].value_counts().to_dict() == {
        "true_positive": 2,
        "false_negative": 2,
        "false_positive": 3,
    }
    assert list(every[every.category == "false_positive"]["patient_id"]) == ["e", "f", "h"]


class _TinyPairs:
    """Stands in for the holdout PairedDataset: sample dicts and per-sample patient ids."""

    def __init__(self, ids: list[str]):
        gen = torch.Generator().manual_seed(3)
        self.sample_patient_ids = ids
        self.samples = [
            {"dm": torch.rand(1, 64, 64, generator=gen), "us": torch.rand(1, 96, 96, generator=gen)}
            for _ in ids
        ]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]


def test_write_gallery_writes_overlays_and_index(fusion_model, tmp_path: Path):
    from PIL import Image

    ds = _TinyPairs(["p1", "p1", "p2", "p3"])
    preds = pd.DataFrame(
        {"patient_id": ["p1", "p2", "p3"], "y_true": [1, 1, 0], "y_score": [0.9, 0.2, 0.7]}
    )
    index = G.write_gallery(fusion_model, ds, preds, 0.5, tmp_path / "gradcam", per_category=2)
    assert list(index.columns) == ["patient_id", "category", "branch", "file", "raw_file", "score"]
    assert len(index) == 6  # 3 patients × 2 branches
    assert set(index["category"]) == {"true_positive", "false_negative", "false_positive"}
    on_disk = pd.read_csv(tmp_path / "gradcam" / "index.csv", dtype={"patient_id": str})
    cols = ["patient_id", "branch", "file", "raw_file"]
    assert on_disk[cols].equals(index[cols])
    first = {"p1": 0, "p2": 2, "p3": 3}
    for row in index.itertuples():
        img = Image.open(tmp_path / "gradcam" / row.file)
        assert img.mode == "RGB" and img.size == (SIZES[row.branch],) * 2
        rgb = np.asarray(img).astype(int)
        assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 0  # coloured, not the grey image alone
        # beside it, the model's own input, un-overlaid (the patient's first sample)
        raw = np.asarray(Image.open(tmp_path / "gradcam" / row.raw_file))
        expected = ds.samples[first[row.patient_id]][row.branch][0].numpy()
        assert raw.shape == expected.shape and row.raw_file.startswith("raw/")
        np.testing.assert_array_equal(raw, np.rint(expected * 255).astype(np.uint8))
    assert (tmp_path / "gradcam" / "captions.json").is_file()
    # the report gallery globs the top folder: raw images must not show up there as tiles
    assert sorted(p.name for p in (tmp_path / "gradcam").glob("*.png")) == sorted(index["file"])


def test_gallery_without_labels_groups_patients_by_call(fusion_model, tmp_path: Path):
    ds = _TinyPairs(["p1", "p2", "p3"])
    preds = pd.DataFrame({"patient_id": ["p1", "p2", "p3"], "y_score": [2.0, -1.0, 0.5]})
    index = G.write_gallery(fusion_model, ds, preds, 0.0, tmp_path / "g", per_category=1)
    got = dict(zip(index["category"], index["patient_id"], strict=False))
    assert got == {"called_malignant": "p1", "called_benign": "p2"}


def _calibrated(members, cals):
    from breastfusion.models.ensemble import CalibratedEnsemble

    a, b = zip(*cals, strict=True)
    return CalibratedEnsemble(members, a, b, ("dm", "us")).eval()


def hand_gradcam_log_odds(model, inputs, branch):
    """``hand_gradcam`` of the malignant log-odds logit[1] - logit[0] (what a calibrated
    model's output[:, 1] is, up to a positive factor that Grad-CAM's scaling removes)."""

    class LogOdds(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *x):
            logits = self.m(*x)
            return torch.stack([logits[:, 0] * 0, logits[:, 1] - logits[:, 0]], dim=1)

        def gradcam_target_layer(self, b):
            return self.m.gradcam_target_layer(b)

    wrapped = LogOdds(model)
    wrapped.input_names = ("dm", "us")
    return hand_gradcam(wrapped, inputs, branch)


@pytest.mark.parametrize("branch", ["dm", "us"])
def test_calibrated_model_explains_its_log_odds(fusion_model, branch):
    inputs = _inputs(SIZES)
    calibrated = _calibrated([fusion_model], [(2.5, -0.7)])
    got = G.gradcam_maps(calibrated, inputs)[branch]
    expected = hand_gradcam_log_odds(fusion_model, inputs, branch)
    assert expected.max() > 0.9
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_ensemble_map_per_branch_aggregates_its_members(fusion_model):
    torch.manual_seed(1)
    other = build_model("fusion").eval()
    inputs = _inputs(SIZES, batch=1)
    cals = [(1e-3, 0.2), (40.0, -1.0)]  # scales that differ: the maps must not care
    ensemble = _calibrated([fusion_model, other], cals)
    maps = G.gradcam_maps(ensemble, inputs)
    assert set(maps) == {"dm", "us"}
    for branch, got in maps.items():
        per_member = [G.gradcam_maps(_calibrated([m], [c]), inputs)[branch]
                      for m, c in zip([fusion_model, other], cals, strict=True)]  # fmt: skip
        mean = np.mean(per_member, axis=0)
        lo = mean.min(axis=(1, 2), keepdims=True)
        hi = mean.max(axis=(1, 2), keepdims=True)
        # pytorch-grad-cam min-max scales each layer's map before upsampling it, and a member's
        # own map is scaled again after (bilinear upsampling misses the maximum by ~1e-4):
        # the aggregate matches to ~1e-3, far below the members' difference (> 0.1)
        np.testing.assert_allclose(got, (mean - lo) / (hi - lo + 1e-7), atol=2e-3)
        assert np.abs(per_member[0] - per_member[1]).max() > 0.1  # two different members


def test_pytorch_grad_cam_is_imported_only_in_gradcam_module():
    package = Path(G.__file__).resolve().parents[1]
    imports = re.compile(r"^\s*(from|import)\s+pytorch_grad_cam\b", re.MULTILINE)
    users = sorted(
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if imports.search(p.read_text(encoding="utf-8"))
    )
    assert users == ["explain/gradcam.py"]
