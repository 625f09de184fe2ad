"""The command line: light start-up, every registered command importable, clean errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from breastfusion.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "ultralytics", "pytorch_grad_cam", "albumentations", "optuna")


def test_import_and_help_do_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from breastfusion.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "finally:\n"
        f"    print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "platform"), "PATH": "/usr/bin:/bin"}, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_registered_command_resolves(name):
    import click

    from breastfusion.cli import cli

    command = cli.get_command(click.Context(cli), name)
    assert isinstance(command, click.Command)


def test_unknown_command_exits_non_zero(capsys):
    assert main(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    code = main(["validate", str(tmp_path / "missing.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert "missing.csv" in err and "Traceback" not in err
