"""Backbones, heads and the registry: shapes, gradients, sizes, weights, export."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from breastfusion.errors import ConfigError, UserError
from breastfusion.models.registry import (
    BACKBONES,
    Registry,
    backbone_names,
    backbone_params,
    check_input_size,
    feature_dim,
    fusion_names,
    head_names,
    min_input_size,
)

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from breastfusion.models.backbones import build_backbone  # noqa: E402
from breastfusion.models.fusion import build_model  # noqa: E402

EXPECTED_BACKBONES = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "inception_v3",
    "vgg16",
    "googlenet",
]


@pytest.fixture(autouse=True)
def _few_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grey(size: int, batch: int = 2):
    return torch.rand(batch, 1, size, size)


# --- registry (no torch needed) -------------------------------------------------------


def test_registry_names_and_sizes():
    assert backbone_names() == EXPECTED_BACKBONES
    assert fusion_names() == ["sum", "concat", "gated"]
    assert head_names() == ["single", "sum", "concat", "gated"]
    sizes = {n: min_input_size(n) for n in EXPECTED_BACKBONES}
    assert sizes == {
        "resnet18": 32,
        "resnet50": 32,
        "resnext50_32x4d": 32,
        "inception_v3": 75,
        "vgg16": 32,
        "googlenet": 32,
    }
    check_input_size("inception_v3", 75, 300)
    with pytest.raises(ConfigError, match=r"64x64 is too small for backbone 'inception_v3'.*75x75"):
        check_input_size("inception_v3", 64)


def test_registry_duplicate_raises():
    reg = Registry("thing")
    reg.register("a", lambda: 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a", lambda: 2)
    with pytest.raises(ValueError, match="already registered"):
        BACKBONES.register("resnet18", lambda **kw: None)

    @reg.register("b", tag=1)
    def build_b():
        return 2

    assert reg.get("b")() == 2 and reg.meta("b") == {"tag": 1}
    assert reg.names() == ["a", "b"]


def test_registry_unknown_lists_known_names():
    with pytest.raises(ConfigError) as info:
        BACKBONES.get("resnet19")
    message = str(info.value)
    assert "unknown backbone 'resnet19'" in message
    for name in EXPECTED_BACKBONES:
        assert name in message
    assert isinstance(info.value, UserError)
    with pytest.raises(ConfigError, match="unknown backbone 'alexnet'.*resnet18"):
        build_model("dm", backbone_dm="alexnet")
    with pytest.raises(ConfigError, match="unknown fusion 'max'; known: sum, concat, gated"):
        build_model("fusion", fusion="max")
    with pytest.raises(ConfigError, match="unknown modality 'mri'"):
        build_model("mri")


def test_registry_import_does_not_import_torch():
    code = (
        "import sys\n"
        "from breastfusion.models.registry import backbone_names, head_names, min_input_size\n"
        "assert 'resnet18' in backbone_names() and 'sum' in head_names()\n"
        "assert min_input_size('inception_v3') == 75\n"
        "heavy = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- backbones ------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPECTED_BACKBONES)
def test_backbone_forward_backward_and_min_size(name):
    """Smallest valid input trains (aux heads off: a plain tensor in train mode); one px less is refused."""
    size = min_input_size(name)
    model, dim = build_backbone(name)
    assert dim == feature_dim(name) == model.feature_dim
    # The registry's parameter count (the best rule's tie-break) is the real one.
    assert sum(p.numel() for p in model.parameters()) == backbone_params(name)
    model.train()
    out = model(grey(size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, dim)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "every parameter is used (no dead aux head)"
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    assert isinstance(model.gradcam_target_layer(), torch.nn.Module)

    too_small = torch.rand(2, 1, size - 1, size + 10)
    with pytest.raises(ConfigError) as info:
        model(too_small)
    assert str(info.value) == (
        f"input size {size - 1}x{size + 10} is too small for backbone {name!r}: "
        f"minimum is {size}x{size}"
    )


@pytest.mark.parametrize("name", ["resnet18", "inception_v3", "googlenet"])
def test_backbone_matches_torchvision_features(name):
    """Our trunk + replicate stem computes torchvision's pooled features on normalised RGB."""
    size = min_input_size(name)
    model, _ = build_backbone(name)
    model.eval()
    kwargs = {"aux_logits": False, "init_weights": False} if name != "resnet18" else {}
    reference = getattr(torchvision.models, name)(**kwargs)
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(model.trunk.state_dict(), strict=False)
    reference.eval()
    if hasattr(reference, "transform_input"):
        reference.transform_input = False
    mean, std = (0.5, 0.5) if name != "resnet18" else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = grey(size)
    rgb = (x.expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(
        1, -1, 1, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(rgb), atol=1e-4, rtol=1e-4)


def test_adapt_stem_takes_one_channel():
    model, dim = build_backbone("resnet18", input_mode="adapt")
    assert model.trunk.conv1.in_channels == 1
    assert model.stem.mean.shape == (1, 1, 1, 1)
    assert model(grey(32)).shape == (2, dim)
    with pytest.raises(ConfigError, match="unknown input_mode 'rgb'"):
        build_backbone("resnet18", input_mode="rgb")
    with pytest.raises(ConfigError, match="takes \\(1,\\) input channels, not 3"):
        build_backbone("resnet18", input_mode="adapt", in_channels=3)


def test_random_init_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="breastfusion.models.backbones"):
        build_backbone("resnet18")
    assert "backbone resnet18: random init (pretrained=none)" in caplog.text


# --- pretrained weights ---------------------------------------------------------------


def test_pretrained_from_local_file(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)  # includes fc.*, which must be dropped

    model, _ = build_backbone("resnet18", pretrained=str(path))
    torch.testing.assert_close(model.trunk.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    torch.testing.assert_close(model.trunk.conv1.weight, source.conv1.weight)

    adapted, _ = build_backbone("resnet18", pretrained=path, input_mode="adapt")
    torch.testing.assert_close(
        adapted.trunk.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True)
    )
    torch.testing.assert_close(adapted.trunk.layer4[1].bn2.bias, source.layer4[1].bn2.bias)


def test_pretrained_googlenet_file_drops_aux_heads(tmp_path):
    source = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    path = tmp_path / "googlenet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model, _ = build_backbone("googlenet", pretrained=path)
    assert not any(k.startswith(("aux", "fc")) for k in model.trunk.state_dict())
    torch.testing.assert_close(model.trunk.inception5b.branch1.conv.weight,
                               source.inception5b.branch1.conv.weight)  # fmt: skip


def test_pretrained_mismatched_file_is_explained(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    del state["layer1.0.conv1.weight"]
    state["head.extra"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError) as info:
        build_backbone("resnet18", pretrained=path)
    message = str(info.value)
    assert f"pretrained weights {path} do not match backbone 'resnet18'" in message
    assert "missing: layer1.0.conv1.weight" in message
    assert "unexpected: head.extra" in message
    assert "shape mismatch: conv1.weight: file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in message


def test_pretrained_missing_file_says_where(tmp_path):
    path = tmp_path / "weights" / "resnet18.pth"
    with pytest.raises(ConfigError) as info:
        build_backbone("resnet18", pretrained=str(path))
    message = str(info.value)
    assert f"pretrained weights file {path} for backbone 'resnet18' does not exist" in message
    assert "put a torchvision resnet18 state dict there" in message


def test_pretrained_imagenet_offline_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # A closed local port as proxy: fails at once, with or without internet.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(ConfigError) as info:
        build_backbone("resnet18", pretrained="imagenet")
    message = str(info.value)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "pretrained=imagenet for backbone 'resnet18'" in message
    assert f"put the file resnet18-f37072fd.pth at {expected}" in message
    assert "$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth" in message


# --- heads and models -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "fusion", "backbone_us"),
    [
        ("dm", "sum", "resnet18"),
        ("us", "sum", "resnet18"),
        ("fusion", "sum", "resnet18"),
        ("fusion", "sum", "googlenet"),  # 512 vs 1024 features: both projected to 512
        ("fusion", "concat", "googlenet"),
        ("fusion", "gated", "resnet18"),
        ("fusion", "gated", "googlenet"),
    ],
)
def test_head_forward_backward(modality, fusion, backbone_us):
    model = build_model(modality, "resnet18", backbone_us, fusion=fusion, dropout=0.1)
    model.train()
    if modality == "fusion":
        logits = model(grey(32), grey(32))
        assert set(model.branches) == {"dm", "us"}
        assert model.backbone_names == {"dm": "resnet18", "us": backbone_us}
    else:
        logits = model(grey(32))
        assert set(model.branches) == {modality}
    assert logits.shape == (2, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())
    for branch in model.branches:
        assert isinstance(model.gradcam_target_layer(branch), torch.nn.Module)
    with pytest.raises(ConfigError, match="model has no branch 'mri'"):
        model.gradcam_target_layer("mri")


def test_head_projection_only_when_dims_differ():
    same = build_model("fusion", "resnet18", "resnet18", fusion="sum")
    assert isinstance(same.head.proj_dm, torch.nn.Identity)
    mixed = build_model("fusion", "resnet18", "googlenet", fusion="sum")
    assert mixed.head.proj_us.in_features == 1024 and mixed.head.proj_us.out_features == 512
    assert mixed.head.proj_dm.in_features == 512


def test_dual_resnet18_parameter_count():
    model = build_model("fusion", "resnet18", "resnet18", fusion="sum")
    # 2 × 11,176,512 (ResNet-18 without fc) + Linear(512, 2); the study reports ~22.9 M.
    assert sum(p.numel() for p in model.parameters()) == 22_354_050


def test_per_branch_pretrained(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("fusion", pretrained={"dm": path, "us": "none"})
    torch.testing.assert_close(model.branches["dm"].trunk.conv1.weight, source.conv1.weight)
    assert not torch.equal(model.branches["us"].trunk.conv1.weight, source.conv1.weight)


def test_torchscript_trace_script_and_channels_last(tmp_path):
    model = build_model("fusion").eval()
    dm, us = grey(64), grey(64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated, still supported
        expected = model(dm, us)
        traced = torch.jit.trace(model, (dm, us))
        scripted = torch.jit.script(model)
        torch.jit.save(traced, tmp_path / "model.ts")
        loaded = torch.jit.load(tmp_path / "model.ts")
        torch.testing.assert_close(loaded(dm, us), expected)
        torch.testing.assert_close(scripted(dm, us), expected)
        # A traced model on new data of the same shape still follows the model.
        dm2, us2 = grey(64), grey(64)
        torch.testing.assert_close(loaded(dm2, us2), model(dm2, us2))

        model = model.to(memory_format=torch.channels_last)
        channels_last = model(
            dm.contiguous(memory_format=torch.channels_last),
            us.contiguous(memory_format=torch.channels_last),
        )
        torch.testing.assert_close(channels_last, expected, atol=1e-5, rtol=1e-4)


def test_pretrained_imagenet_from_filled_cache(tmp_path, monkeypatch):
    """A file dropped into $TORCH_HOME/hub/checkpoints is used without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), checkpoints / "resnet18-f37072fd.pth")
    model, _ = build_backbone("resnet18", pretrained="imagenet")
    torch.testing.assert_close(model.trunk.conv1.weight, source.conv1.weight)


def test_upsample_small_enlarges_inputs_below_the_minimum_instead_of_refusing():
    """model.upsample_small: Inception v3 takes a 48 px input by enlarging it to 75 px, which
    gives exactly what the same model computes on the input enlarged beforehand."""
    from breastfusion.config import Config

    torch.manual_seed(0)
    model = build_model("dm", backbone_dm="inception_v3", upsample_small=True).eval()
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        out = model(x)
        model.branches["dm"].upsample_small = False
        big = torch.nn.functional.interpolate(
            x, size=(75, 75), mode="bilinear", align_corners=False
        )
        assert torch.allclose(out, model(big), atol=1e-6)
        with pytest.raises(ConfigError, match="too small"):
            model(x)
    Config.from_dict(
        {"model": {"backbone_dm": "inception_v3", "upsample_small": True}, "data": {"size_dm": 48}}
    )
    with pytest.raises(ConfigError, match="model.upsample_small"):
        Config.from_dict({"model": {"backbone_dm": "inception_v3"}, "data": {"size_dm": 48}})
