"""``benchmarks/replicate_study.py`` on a toy cohort: the plumbing of the scientific check
(cohort, box crops, splits, three refits through ``breastfusion.final``, the holdout table
through ``breastfusion.evaluate.holdout``, reuse of finished models). Its numbers mean nothing
at this size; the full run is the lead's (see the script's docstring)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "replicate_study.py"
TINY = ["--patients", "40", "--epochs", "1", "--size", "32", "--source-size", "48"]


def _load():
    spec = importlib.util.spec_from_file_location("_bench_replicate_study", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three refits and two evaluations: ~15 s quiet, ~35 s on busy cores
def test_replicate_study_runs_end_to_end_and_reuses_finished_models(tmp_path, capsys):
    bench = _load()
    argv = [*TINY, "--bootstrap", "200", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "Holdout Table 3 (" in out
    for name in ("DM only", "US only", "DM+US"):
        assert f"| {name} | " in out
    assert "DM+US vs DM only: AUC " in out and "DM+US vs US only: AUC " in out
    assert "oracle (latent suspicion" in out
    models = sorted((tmp_path / "models").iterdir())
    assert [m.name.split("_")[0] for m in models] == ["dm", "fusion", "us"]
    for folder in models:
        final = json.loads((folder / "final.json").read_text())
        assert final, folder
        assert not (folder / "bundle" / "model.onnx").exists()  # onnx: false
        metrics = json.loads((folder / "metrics.json").read_text())
        (entry,) = metrics["models"].values()
        assert entry["score_scale"] == "logit"  # log-odds, never probabilities
    assert bench.main(argv) == 0  # the second run only re-evaluates
    again = capsys.readouterr().out
    assert again.count(": reusing ") == 5  # cohort, crops, three models
    table = [line for line in out.splitlines() if line.startswith("| DM")]
    assert table == [line for line in again.splitlines() if line.startswith("| DM")]
