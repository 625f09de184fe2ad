"""Writing a bundle's files: the state dict, the ONNX network, the config, the detector.

ONNX rather than TorchScript: ``torch.jit`` is deprecated upstream (``torch.jit.load`` warns
in torch 2.x), while ONNX loads without Python classes in onnxruntime and most serving
stacks. The network is exported with torch's dynamo exporter (``onnxscript``) with a dynamic
batch axis, as one self-contained file (no external weight file), and checked against the
torch model with onnxruntime before it is kept.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion.errors import UserError
from breastfusion.final.bundle import CONFIG_FILE, DETECTOR_DIR, ONNX_FILE, WEIGHTS_FILE
from breastfusion.io import atomic_write_bytes, atomic_write_text, link_or_copy, shareable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from breastfusion.config import Config

log = logging.getLogger(__name__)
ONNX_TOLERANCE = 1e-4  # largest |ONNX - torch| allowed on the calibrated log-odds
ONNX_OPSET = 18


def example_inputs(cfg: Config, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random [0, 1] grey inputs of the model's input sizes, in call order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.rand(batch, 1, s, s, generator=gen)
        for s in (getattr(cfg.data, f"size_{b}") for b in cfg.branches)
    )


def write_state(model: nn.Module, dest: Path) -> Path:
    import torch

    from breastfusion.engine.checkpoint import cpu_state_dict

    buf = io.BytesIO()
    torch.save(cpu_state_dict(model), buf)
    return atomic_write_bytes(dest / WEIGHTS_FILE, buf.getvalue())


def write_onnx(model: nn.Module, cfg: Config, dest: Path) -> dict[str, Any]:
    """``model.onnx`` (dynamic batch), checked against ``model``; returns facts for metadata."""
    import numpy as np
    import torch

    from breastfusion.final.scoring import OnnxRunner

    model = model.cpu().eval()
    examples = example_inputs(cfg)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # forward(*inputs): the inputs are one (varargs) argument, so their shapes are one tuple
    shapes = (tuple({0: batch} for _ in examples),)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model,
            examples,
            None,
            input_names=list(cfg.branches),
            output_names=["logits"],
            dynamic_shapes=shapes,
            dynamo=True,
            opset_version=ONNX_OPSET,
            verbose=False,
        )
    path = dest / ONNX_FILE
    tmp = dest / f".{ONNX_FILE}.tmp"
    program.save(str(tmp), external_data=False)
    shareable(tmp)
    tmp.replace(path)
    check = example_inputs(cfg, batch=5, seed=1)  # another batch size than traced
    with torch.no_grad():
        expected = model(*check).double().numpy()
    got = OnnxRunner(path, cfg.branches)([x.numpy() for x in check])
    diff = float(np.max(np.abs(got - expected)))
    # float32 kernels differ by rounding: the bound grows with the scores' magnitude.
    allowed = ONNX_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
    if not diff <= allowed:
        path.unlink(missing_ok=True)
        reason = (
            f"the ONNX export differs from the torch model by {diff:.3g} (allowed {allowed:.3g})"
            "; the bundle has no model.onnx (predict --backend torch still works)"
        )
        log.warning("%s", reason)
        return {"file": None, "opset": ONNX_OPSET, "max_abs_diff_vs_torch": diff, "skipped": reason}
    return {"file": ONNX_FILE, "opset": ONNX_OPSET, "max_abs_diff_vs_torch": diff}


def bundle_config(cfg: Config) -> Config:
    """The training config without the training data's locations (the bundle is moved and
    shared; the data summary is in metadata.json) and without a pretrained-weights path."""
    return cfg.with_overrides(
        {
            "data.manifest": None,
            "data.splits": None,
            "data.cache_dir": None,
            "model.pretrained": "none",
        }
    )


def write_config(cfg: Config, dest: Path) -> Path:
    from breastfusion.config import dump_yaml

    return atomic_write_text(dest / CONFIG_FILE, dump_yaml(bundle_config(cfg)))


def copy_detector(source: Path, dest: Path) -> dict[str, Any]:
    """Copy a detector bundle (``roi.bundle``: ``detector.json`` + weights) into
    ``dest/detector`` and check the copy; returns its description for metadata."""
    from breastfusion.roi.bundle import META_FILE, read_bundle

    record, crop = read_bundle(source)
    target = dest / DETECTOR_DIR
    target.mkdir(parents=True, exist_ok=True)
    shareable(target, folder=True)
    shutil.copyfile(Path(source) / META_FILE, target / META_FILE)
    shareable(target / META_FILE)
    link_or_copy(Path(source) / record["weights"], target / record["weights"])
    copied, _ = read_bundle(target)  # checksum and format, on the copy
    return {"record": copied, "crop": crop}


def check_detector(source: Path | None) -> None:
    """Fail before any training when the detector folder is not a detector bundle."""
    if source is None:
        return
    from breastfusion.roi.bundle import read_bundle

    try:
        read_bundle(source)
    except UserError as exc:
        raise UserError(f"detector_dir: {exc}") from None
