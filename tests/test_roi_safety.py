"""No code from weight files, nothing left behind: the real CLI and ultralytics, in
subprocesses with HOME and the temp folder redirected (see ``test_roi._offline_env``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from breastfusion.errors import Terminated
from breastfusion.roi.workdir import OWNER_FILE, build_dir
from test_roi import _offline_env, write_cohort

_RUNNER = r"""
import json, sys
from breastfusion.cli import main
for argv in json.loads(sys.argv[1]):
    print("CODE", main(argv), flush=True)
if len(sys.argv) > 2:
    exec(sys.argv[2])
"""


def _run(tmp: Path, argvs: list[list[str]], after: str | None = None, **kwargs):
    args = [sys.executable, "-c", _RUNNER, json.dumps(argvs)] + ([after] if after else [])
    env = kwargs.pop("env", None) or _offline_env(tmp)
    return subprocess.run(
        args, cwd=tmp / "cwd", env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


def _payload(path: Path, marker: Path) -> None:
    """A .pt file whose unpickling creates ``marker`` (builtins.open, no shell needed)."""
    import torch

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Payload(), "train_args": {}}, path)


def test_weights_files_never_run_code(tmp_path: Path) -> None:
    manifest = write_cohort(tmp_path / "cohort", n_patients=4, us_per_patient=1)
    evil, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    _payload(evil, marker)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    wrong = tmp_path / "weights.bin"
    wrong.write_bytes(b"x")
    base = ["--manifest", str(manifest), "--out"]
    argvs = [
        ["roi", "crop", *base, str(tmp_path / "c1"), "--weights", str(evil)],
        ["roi", "train", *base, str(tmp_path / "t1"), "--weights", str(evil), "--epochs", "1"],
        ["roi", "crop", *base, str(tmp_path / "c2"), "--weights", str(junk)],
        ["roi", "crop", *base, str(tmp_path / "c3"), "--weights", str(wrong)],
    ]
    # The bundle path (predict) loads through the same door.
    after = (
        "from breastfusion.roi.bundle import export_detector, load_detector\n"
        "from breastfusion.roi.settings import CropSettings, DetectorTrainSettings\n"
        "from breastfusion.errors import UserError\n"
        f"export_detector({str(tmp_path / 'bundle')!r}, {str(evil)!r}, "
        "DetectorTrainSettings(), CropSettings(), {})\n"
        f"try:\n    load_detector({str(tmp_path / 'bundle')!r})\n"
        "except UserError as exc:\n    print('BUNDLE', exc)\n"
    )
    proc = _run(tmp_path, argvs, after)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("CODE 2") == 4, proc.stdout + proc.stderr[-3000:]
    assert not marker.exists(), "unpickling the payload ran code"
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, proc.stderr
    assert f"error: detector weights (--weights) {evil}: not a YOLO checkpoint that can be " \
           "loaded safely" in errors[0]  # fmt: skip
    assert errors[1].startswith(f"error: roi.train.weights (--weights) {evil}: not a YOLO")
    assert errors[2].startswith(f"error: detector weights (--weights) {junk}: not a YOLO")
    assert errors[3] == f"error: detector weights (--weights) {wrong}: expected a .pt file"
    assert "BUNDLE " in proc.stdout and "not a YOLO checkpoint" in proc.stdout
    assert not any((tmp_path / n).exists() for n in ("c1", "t1", "c2", "c3"))
    assert not list(tmp_path.glob(".*.tmp"))
    # Control: the payload is live, so the absence of the marker above means something.
    (tmp_path / "ctl").mkdir()
    load = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    control = _run(tmp_path / "ctl", [], load)
    assert marker.exists(), control.stderr[-2000:]


def _train_argv(manifest: Path, out: Path, epochs: int = 200) -> list[str]:
    return ["roi", "train", "--manifest", str(manifest), "--out", str(out),
            "--epochs", str(epochs), "--imgsz", "64", "--batch", "4"]  # fmt: skip


def _start_and_wait_for_first_epoch(tmp: Path, argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, json.dumps([argv])],
        cwd=tmp / "cwd",
        env=_offline_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith("detector epoch"):  # the first epoch has finished
            return proc
    proc.wait(timeout=60)
    raise AssertionError(f"no epoch line: {lines} {proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]


def test_terminated_training_removes_its_temporary_folder(tmp_path: Path) -> None:
    """SIGTERM mid-training: exit 143, no temporary copy of the data set, the earlier
    output untouched."""
    manifest = write_cohort(tmp_path / "cohort", n_patients=6, us_per_patient=1)
    out = tmp_path / "runs" / "det"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"old": true}')  # an earlier run's output
    proc = _start_and_wait_for_first_epoch(tmp_path, _train_argv(manifest, out))
    building = list(out.parent.glob(".det.*.tmp"))
    assert len(building) == 1 and (building[0] / "dataset").is_dir()
    # The build folder names its owner, so a run killed by SIGKILL (which cannot be caught)
    # is cleaned up by the next one (test_stale_folders_removed_only_when_ours_and_dead).
    owner = json.loads((building[0] / OWNER_FILE).read_text())
    assert owner["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]  # the runner itself exits normally
    assert "CODE 143" in stdout and "terminated" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["det"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert json.loads((out / "metrics.json").read_text()) == {"old": True}


def test_interrupt_from_inside_training_leaves_nothing(tmp_path: Path) -> None:
    """KeyboardInterrupt raised by the per-epoch progress callback (as Ctrl-C would)."""
    manifest = write_cohort(tmp_path / "cohort", n_patients=6, us_per_patient=1)
    out = tmp_path / "det"
    code = (
        "import json\n"
        "from breastfusion.data.manifest import load_manifest\n"
        "from breastfusion.roi.train import train_detector\n"
        "seen = []\n"
        "def stop(p):\n"
        "    seen.append(p.epoch)\n"
        "    raise KeyboardInterrupt\n"
        "try:\n"
        f"    train_detector(load_manifest({str(manifest)!r}), {str(out)!r}, epochs=50, "
        "imgsz=64, batch=4, progress=stop)\n"
        "except KeyboardInterrupt:\n"
        "    print('INTERRUPTED', json.dumps(seen))\n"
    )
    proc = _run(tmp_path, [], code)
    assert "INTERRUPTED [1]" in proc.stdout, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "cwd", "home", "tmpdir"]
    assert list((tmp_path / "cwd").iterdir()) == []


def test_stale_folders_removed_only_when_ours_and_dead(tmp_path: Path) -> None:
    out = tmp_path / "crops"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    import socket

    def fake(name: str, pid: int | None, host: str | None = None) -> Path:
        folder = tmp_path / name
        (folder / "sub").mkdir(parents=True)
        if pid is not None:
            record = {"pid": pid, "host": host or socket.gethostname()}
            (folder / OWNER_FILE).write_text(json.dumps(record))
        return folder

    stale = fake(".crops.aaaa.tmp", int(dead.stdout))
    alive = fake(".crops.bbbb.tmp", os.getppid())
    foreign = fake(".crops.cccc.tmp", None)  # no owner file: not ours
    elsewhere = fake(".crops.dddd.tmp", int(dead.stdout), host="another-host")
    other = fake(".other.eeee.tmp", int(dead.stdout))
    if os.name != "posix":
        pytest.skip("liveness probe is POSIX-only")
    with build_dir(out, marker="done.txt") as tmp:
        (tmp / "done.txt").write_text("ok")
        assert (tmp / OWNER_FILE).is_file()
    assert not stale.exists()
    assert alive.exists() and foreign.exists() and elsewhere.exists() and other.exists()
    assert sorted(p.name for p in out.iterdir()) == ["done.txt"]  # owner file not kept


def test_build_dir_turns_sigterm_into_interrupt(tmp_path: Path) -> None:
    out = tmp_path / "o"
    outer = signal.getsignal(signal.SIGTERM)  # cli.main, run in-process by other tests, sets one
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as for a library caller
    try:
        with pytest.raises(Terminated, match="terminated by SIGTERM"):
            with build_dir(out, marker="m") as tmp:
                (tmp / "big").write_text("x")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted by the signal long before this ends
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert list(tmp_path.iterdir()) == []


def test_link_or_copy_links_where_it_can_and_copies_otherwise(tmp_path: Path, monkeypatch) -> None:
    """Detector weights go into every bundle: a hard link costs no disk; where the file
    system refuses links, an independent copy with the umask's mode."""
    import os

    from breastfusion.io import link_or_copy

    source = tmp_path / "best.pt"
    source.write_bytes(b"weights")
    linked = link_or_copy(source, tmp_path / "bundle" / "detector.pt")
    assert linked.read_bytes() == b"weights" and os.stat(linked).st_ino == os.stat(source).st_ino

    def refuse(*_a, **_k):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    copied = link_or_copy(source, tmp_path / "other" / "detector.pt")
    assert copied.read_bytes() == b"weights" and os.stat(copied).st_ino != os.stat(source).st_ino
    umask = os.umask(0o022)
    os.umask(umask)
    assert copied.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in copied.parent.iterdir()] == ["detector.pt"]  # no temporary left
