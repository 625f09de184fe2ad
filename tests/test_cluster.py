"""cluster.yaml: valid for Ray's cluster launcher and naming what a GPU search needs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_launcher_schema_accepts_it(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))  # raises on a schema error


def test_a_cpu_head_and_autoscaling_gpu_workers(cluster):
    assert cluster["provider"]["type"] in {"aws", "gcp", "azure"}
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type"
    assert all(t["max_workers"] >= 1 for t in gpu_types)
    assert cluster["max_workers"] >= max(t["max_workers"] for t in gpu_types)


def test_setup_installs_this_package_from_the_mounted_code(cluster):
    mounts = cluster["file_mounts"]
    code = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert code, "the repository is not mounted on the nodes"
    setup = " && ".join(cluster["setup_commands"])
    assert "pip install" in setup and code[0] in setup
    assert ".venv" in cluster["rsync_exclude"]  # the local virtualenv never travels


def test_token_auth_is_on_and_the_dashboard_stays_on_localhost(cluster):
    mounts = cluster["file_mounts"]
    assert any(local.endswith(".ray/auth_token") for local in mounts.values())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cluster["worker_start_ray_commands"])
