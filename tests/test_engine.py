"""Engine: fit/evaluate on tiny in-memory data with tiny models (no registry, no images)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from breastfusion.config import Config, OptimConfig, TrainConfig
from breastfusion.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from breastfusion.engine.loop import (
    BEST_NAME,
    LAST_NAME,
    evaluate,
    fit,
    patient_auc,
    seed_everything,
)
from breastfusion.errors import UserError

SIDE = 8


class DictDataset(Dataset):
    """Samples shaped like breastfusion's datasets: {"image"|"dm"+"us", "y", "patient_id"}."""

    def __init__(self, images, labels, patients, paired=False):
        self.images, self.labels, self.patients, self.paired = images, labels, patients, paired

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        sample = {"y": int(self.labels[i]), "patient_id": self.patients[i]}
        if self.paired:
            sample["dm"], sample["us"] = self.images[i], self.images[i].flip(-1)
        else:
            sample["image"] = self.images[i]
        return sample


def make_data(n_patients=8, per_patient=2, signal=1.0, seed=0, paired=False):
    """Two images per patient; malignant images are brighter by ``signal`` (0 = pure noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = [p % 2 for p in range(n_patients) for _ in range(per_patient)]
    patients = [f"P{p:03d}" for p in range(n_patients) for _ in range(per_patient)]
    images = torch.rand(len(labels), 1, SIDE, SIDE, generator=g) * 0.5
    images += signal * 0.5 * torch.tensor(labels, dtype=torch.float32).view(-1, 1, 1, 1)
    return DictDataset(images, labels, patients, paired)


class TinyNet(nn.Module):
    """A small MLP: can memorise a handful of random images, fast on one core."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(SIDE * SIDE, 32), nn.ReLU(), nn.Linear(32, 2)
        )

    def forward(self, x):
        return self.net(x)


class TinyFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.dm, self.us = TinyNet(), TinyNet()

    def forward(self, dm, us):
        return self.dm(dm) + self.us(us)


def cfg_for(**optim) -> Config:
    base = {"epochs": 3, "lr": 1e-2, "batch_size": 4, "patience": 0, "seed": 0}
    base.update(optim)
    return Config(optim=OptimConfig(**base), train=TrainConfig(device="cpu"))


def loader(ds, shuffle=False, batch_size=4):
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def new_model(cls=TinyNet):
    seed_everything(123)
    return cls()


def test_overfits_a_tiny_batch():
    ds = make_data(n_patients=8, per_patient=1, signal=0.0)  # pure noise: only memorising helps
    result = fit(cfg_for(epochs=60, lr=1e-2), loader(ds, True), None, model := new_model())
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.2 * losses[0]
    train_pred = evaluate(model, loader(ds), "cpu")
    assert patient_auc(train_pred) == 1.0


def test_fusion_batches_call_model_with_both_inputs():
    ds = make_data(paired=True)
    result = fit(cfg_for(epochs=2), loader(ds, True), loader(ds), new_model(TinyFusion))
    assert result.epochs_run == 2
    assert list(result.val_predictions.columns) == ["patient_id", "y_true", "y_score"]
    assert len(result.val_predictions) == len(ds)


def test_early_stopping_stops_when_val_auc_stalls():
    train = make_data(signal=1.0)
    val = make_data(signal=0.0, seed=1)
    # A learning rate this small cannot move the validation AUC after epoch 1.
    result = fit(cfg_for(epochs=20, lr=1e-12, patience=2), loader(train), loader(val), new_model())
    assert result.stop_reason == "early_stopping"
    assert result.epochs_run == 3
    assert result.best_epoch == 1


def test_callback_receives_metrics_and_can_stop():
    seen = []

    def callback(metrics):
        seen.append(metrics)
        return metrics["epoch"] == 2

    ds = make_data()
    result = fit(cfg_for(epochs=5), loader(ds), loader(ds), new_model(), callback=callback)
    assert [m["epoch"] for m in seen] == [1, 2]
    assert result.stop_reason == "callback"
    expected = {"epoch", "train_loss", "val_loss", "val_auc", "lr", "samples_per_s"}
    assert expected <= set(seen[0])
    assert seen[0]["samples_per_s"] > 0
    assert 0.0 <= seen[0]["val_auc"] <= 1.0
    assert seen[0]["lr"] == pytest.approx(1e-2)


def test_cosine_schedule_lowers_lr():
    seen = []
    ds = make_data()
    fit(
        cfg_for(epochs=3, schedule="cosine"),
        loader(ds),
        loader(ds),
        new_model(),
        callback=seen.append,
    )
    lrs = [m["lr"] for m in seen]
    assert lrs[0] == pytest.approx(1e-2) and lrs[0] > lrs[1] > lrs[2]


def test_cpu_runs_repeat_exactly():
    train, val = make_data(n_patients=12, signal=0.3), make_data(signal=0.3, seed=5)

    def run():
        return fit(cfg_for(epochs=3), loader(train, shuffle=True), loader(val), new_model())

    a, b = run(), run()
    pd.testing.assert_frame_equal(a.val_predictions, b.val_predictions)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


def test_best_state_is_restored_and_checkpointed(tmp_path):
    ds = make_data()
    cfg = cfg_for(epochs=3)
    model = new_model()
    result = fit(cfg, loader(ds, True), loader(ds), model, out_dir=tmp_path)
    assert (tmp_path / LAST_NAME).is_file()
    last = load_checkpoint(tmp_path / LAST_NAME)
    # best.pt exists only when a later epoch did not improve; otherwise last.pt holds the best.
    in_last = result.best_epoch == result.epochs_run
    assert (tmp_path / BEST_NAME).is_file() is not in_last
    assert last.train_state["best_in_last"] is in_last
    best = last if in_last else load_checkpoint(tmp_path / BEST_NAME)
    assert best.config_hash == cfg.config_hash()
    assert best.meta["best_epoch"] == result.best_epoch
    for k, v in model.state_dict().items():
        assert torch.equal(v, best.state_dict[k])
    again = evaluate(model, loader(ds), "cpu")
    np.testing.assert_allclose(again["y_score"], result.val_predictions["y_score"], rtol=1e-6)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    train, val = make_data(n_patients=10, signal=0.3), make_data(signal=0.3, seed=3)
    cfg = cfg_for(epochs=4)
    full_model = new_model()
    full = fit(cfg, loader(train, True), loader(val), full_model)
    # Interrupt after epoch 2, then resume into a fresh model from last.pt.
    fit(
        cfg,
        loader(train, True),
        loader(val),
        new_model(),
        out_dir=tmp_path,
        callback=lambda m: m["epoch"] == 2,
    )
    resumed_model = new_model()
    resumed = fit(
        cfg, loader(train, True), loader(val), resumed_model, out_dir=tmp_path, resume=True
    )
    assert resumed.epochs_run == 4 and resumed.best_epoch == full.best_epoch
    # The returned weights are the best epoch's, whether best.pt or last.pt held them.
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert [h["val_auc"] for h in resumed.history] == [h["val_auc"] for h in full.history]


def test_resume_refuses_a_different_config(tmp_path):
    ds = make_data()
    fit(cfg_for(epochs=1), loader(ds), loader(ds), new_model(), out_dir=tmp_path)
    with pytest.raises(UserError, match="different config"):
        fit(cfg_for(epochs=2), loader(ds), loader(ds), new_model(), out_dir=tmp_path, resume=True)


def test_prepare_hooks_are_called():
    calls = []

    def prepare_model(m):
        calls.append("model")
        return m

    def prepare_loader(dl):
        calls.append("loader")
        return dl

    ds = make_data()
    fit(
        cfg_for(epochs=1),
        loader(ds),
        loader(ds),
        new_model(),
        prepare_model=prepare_model,
        prepare_loader=prepare_loader,
    )
    assert calls == ["model", "loader"]  # validation is never sharded


def test_without_validation_the_last_epoch_is_kept():
    ds = make_data()
    result = fit(cfg_for(epochs=2, patience=1), loader(ds), None, new_model())
    assert result.best_epoch == 2 and result.stop_reason == "completed"
    assert math.isnan(result.best_val_auc)


def test_checkpoint_round_trip_and_tamper_check(tmp_path):
    model = new_model()
    cfg = cfg_for()
    path = save_checkpoint(tmp_path / "m.pt", model, cfg.to_dict(), meta={"val_auc": 0.9})
    ckpt = load_checkpoint(path)
    assert ckpt.config == cfg.to_dict() and ckpt.config_hash == cfg.config_hash()
    assert ckpt.meta == {"val_auc": 0.9}
    other = TinyNet()
    load_weights(other, ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    with pytest.raises(UserError, match="do not fit"):
        load_weights(TinyFusion(), ckpt)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    # A checkpoint whose config was edited after saving no longer matches its hash.
    payload = torch.load(path, weights_only=True)
    payload["config"]["optim"]["lr"] = 1.0
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(UserError, match="hash"):
        load_checkpoint(tmp_path / "edited.pt")


def test_patient_auc_averages_per_patient_first():
    df = pd.DataFrame(
        {
            "patient_id": ["a", "a", "b", "c", "c"],
            "y_true": [1, 1, 0, 0, 0],
            "y_score": [0.9, 0.1, 0.6, 0.2, 0.4],
        }
    )
    # Patient a (mean 0.5) beats c (0.3) but not b (0.6): AUC 0.5, whereas per image 0.75.
    assert patient_auc(df) == pytest.approx(0.5)
    assert math.isnan(patient_auc(df[df.y_true == 0]))


def test_cuda_request_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    ds = make_data()
    with pytest.raises(UserError, match="CUDA is not available"):
        fit(cfg_for(epochs=1), loader(ds), loader(ds), new_model(), device="cuda")


class TinyConv(nn.Module):
    """Convolutions, BatchNorm and a 4-D input: exercises channels_last and autocast."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 2),
        )

    def forward(self, x):
        return self.net(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_amp_and_channels_last():
    ds = make_data(signal=1.0)
    cfg = Config(
        optim=OptimConfig(epochs=3, lr=1e-2, batch_size=4, patience=0),
        train=TrainConfig(device="cuda", amp=True, channels_last=True),
    )
    result = fit(cfg, loader(ds, True), loader(ds), model := new_model(TinyConv))
    assert next(model.parameters()).is_cuda
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.val_predictions["y_score"].between(0, 1).all()


class BlowsUp(TinyNet):
    """Returns NaN logits from the 5th training batch on (epoch 2 with 4 batches per epoch)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > 4:
                out = out * float("nan")
        return out


def test_divergence_stops_and_is_reported():
    seen = []
    ds = make_data()  # 16 samples, batch 4: 4 batches per epoch
    result = fit(
        cfg_for(epochs=5), loader(ds), loader(ds), new_model(BlowsUp), callback=seen.append
    )
    assert result.stop_reason == "diverged" and result.epochs_run == 2
    assert [m["epoch"] for m in seen] == [1, 2] and math.isnan(seen[-1]["train_loss"])
    assert result.best_epoch == 1 and result.best_state


def test_best_weights_survive_a_resume_when_a_later_epoch_did_not_improve(tmp_path):
    """best.pt is written lazily (at the first epoch that does not improve); a resume then
    restores the best epoch's weights from it, not the last epoch's."""
    from breastfusion.engine.checkpoint import cpu_state_dict
    from breastfusion.engine.loop import AmpPolicy, _resume, _save, _State, build_optimizer

    cfg = cfg_for(epochs=3, patience=5)
    model, amp = new_model(), AmpPolicy(torch.device("cpu"), False)
    opt = build_optimizer(cfg.optim, model.parameters())
    state = _State(epoch=1, best_auc=0.7, best_epoch=1)
    state.best_state = cpu_state_dict(model)
    _save(tmp_path, cfg, cfg.to_dict(), model, opt, None, amp, state, True)
    assert not (tmp_path / BEST_NAME).exists()  # last.pt holds the best
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state.epoch = 2
    _save(tmp_path, cfg, cfg.to_dict(), model, opt, None, amp, state, False)
    assert (tmp_path / BEST_NAME).is_file()
    fresh = new_model()
    restored = _resume(tmp_path / LAST_NAME, cfg, fresh, opt, None, amp)
    assert restored.best_on_disk and restored.best_epoch == 1
    for k, v in state.best_state.items():
        assert torch.equal(restored.best_state[k], v), k
        assert not torch.equal(fresh.state_dict()[k], v) or not v.is_floating_point(), k
