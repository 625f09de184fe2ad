"""The data-area benchmarks: what CI can check without a GPU or minutes of training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # gpu_check_ray imports gpu_check by name
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["gpu_check", "scaling"])
def test_help_works(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        _load(name).main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_gpu_check_without_cuda_says_so_and_exits_0(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load("gpu_check").main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "needs a CUDA GPU" in out[0]
    assert json.loads(out[-1]) == {"cuda": False, "skipped": "no CUDA GPU"}


def test_gpu_check_peak_table_and_overlap():
    gpu = _load("gpu_check")
    assert gpu.bf16_peak("NVIDIA H200") == 989e12
    assert gpu.bf16_peak("NVIDIA H100 PCIe") == 756e12  # the more specific name wins
    assert gpu.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.bf16_peak("Tesla T4") is None
    ray_part = _load("gpu_check_ray")
    assert ray_part.max_overlap([(0, 4), (1, 5), (2, 6), (3, 7)]) == 4
    assert ray_part.max_overlap([(0, 1), (1.5, 2), (3, 4), (3.5, 5)]) == 2


def test_scaling_summary_ratio_uses_the_median_per_size():
    scaling = _load("scaling")
    run = lambda s, rss=1.0: {"s_per_patient": s, "peak_rss_gb": rss}  # noqa: E731
    args = scaling.main.__globals__["argparse"].Namespace(
        size=48, batch_size=16, threads=2, pairs_per_patient=2, repeat=3
    )
    summary = scaling.summarise(
        {200: [run(0.10), run(0.30), run(0.12)], 800: [run(0.11), run(0.13, 2.5), run(0.12)]},
        args,
    )
    assert summary["per_patient_cost_ratio"] == pytest.approx(0.12 / 0.12)
    assert summary["peak_rss_gb"] == 2.5
    assert summary["repeat_spread_max_over_min"]["200"] == pytest.approx(3.0)
