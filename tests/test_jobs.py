"""jobs/*.py through ``ray job submit`` against a local head on 127.0.0.1 with token auth on.

The head is started with ``ray start --head --block`` in its own process group and stopped by
signalling that group (never ``ray stop``, which would stop every Ray of this user on a shared
machine). Its token is a private file passed with ``RAY_AUTH_TOKEN_PATH``, so the test neither
needs nor touches ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import make_splits, write_splits
from breastfusion.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_job_scripts_have_debug_and_forward_to_the_cli():
    for script in ("search.py", "study.py"):
        text = (ROOT / "jobs" / script).read_text()
        assert "import _bootstrap" in text and "--debug" in text
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "search.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--space", "--manifest", "--splits", "--out", "--resume", "--debug"):
        assert option in out


def test_study_job_forwards_every_option_to_breastfusion_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "study.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--config", "--out", "--resume", "--debug"):
        assert option in out
    study = tmp_path / "study.yaml"
    study.write_text("data: {synthetic: {}}\nroi: {crop: {marginn: 0.1}}\nfusion: {}\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "study.py"), "--config", str(study)]
        + ["--out", str(tmp_path / "out"), "--resume", "--debug"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert "unknown setting roi.crop.marginn" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def local_head(tmp_path):
    """A token-protected head on 127.0.0.1 (2 CPUs); yields (dashboard address, env)."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: unix socket paths
    gcs, dash, client, agent, agent_grpc, runtime_env, metrics = _free_ports(7)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs' `python` = this one
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            ok = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address],
                env=env,
                capture_output=True,
            )
            if ok.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head's dashboard never answered"
            time.sleep(2)
        yield address, env
    finally:
        pids = [head.pid, *_descendants(head.pid)]
        try:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in pids:  # anything that outlived it, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_search_job_runs_through_ray_job_submit_with_token_auth(
    local_head, synthetic_cohort, tmp_path
):
    address, env = local_head
    # Token auth is really on: a wrong token is refused.
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    refused = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", address],
        env={**env, "RAY_AUTH_TOKEN_PATH": str(wrong)},
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0

    cohort = tmp_path / "cohort"
    shutil.copytree(synthetic_cohort.parent, cohort, ignore=shutil.ignore_patterns(".cache"))
    manifest = cohort / "manifest.csv"
    df = load_manifest(manifest)
    splits = write_splits(
        make_splits(df, folds=2, holdout=0.0, seed=0, manifest_sha256=sha256_file(manifest)),
        tmp_path / "splits.json",
    )
    out = tmp_path / "out"
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/search.py",
            "--space",
            "search_spaces/debug.yaml",
            "--manifest",
            str(manifest),
            "--splits",
            str(splits),
            "--out",
            str(out),
            "--debug",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs[-4000:]
    assert "succeeded" in logs, logs[-4000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "complete").all(), trials.to_string()
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] in set(trials["trial"])
    assert "fold 0 AUC" in logs  # the search's progress lines reach `ray job submit`
