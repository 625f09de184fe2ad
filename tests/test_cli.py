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
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "platform"), "PATH": "/usr/bin:/bin"},
        timeout=60,
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


# --------------------------------------------------------------------------------------------
# Bad input through the real entry point: exit 2, one message naming the culprit, no traceback,
# nothing half-written.


def _run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture()
def not_a_folder(tmp_path: Path) -> Path:
    """An output path whose parent is a regular file: no user (not even root) can write it."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker / "sub"


@pytest.fixture()
def predictions(tmp_path: Path) -> Path:
    path = tmp_path / "pred.csv"
    rows = [f"m,{i:03d},{i % 2},{0.2 + 0.6 * (i % 2) + 0.01 * i}" for i in range(12)]
    path.write_text("model,patient_id,y_true,y_score\n" + "\n".join(rows) + "\n")
    return path


def test_unwritable_outputs_are_user_errors(synthetic_cohort, predictions, not_a_folder, capsys):
    cases = [
        ["synth", "--out", not_a_folder / "cohort", "--patients", 2, "--size", 32],
        ["split", synthetic_cohort, "--out", not_a_folder / "splits.json"],
        ["evaluate", predictions, "--out", not_a_folder / "eval", "--bootstrap", 100],
    ]
    for argv in cases:
        code, err = _run(argv, capsys)
        assert code == 2, (argv, err)
        assert err.startswith("error: cannot create folder") and str(not_a_folder) in err, err
    assert not not_a_folder.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"patient_id,y_true,y_score\n", "no predictions"),
        (b"\xff\xfe\x00garbage\x99" * 50, "not UTF-8"),
        ("model,patient_id,y_true,y_score\nm,Jos\xe9,1,0.5\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_evaluate_bad_prediction_files(tmp_path, capsys, content, expected):
    path = tmp_path / "pred.csv"
    path.write_bytes(content)
    code, err = _run(["evaluate", path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and str(path) in err and expected in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "manifest is empty"),
        (b"patient_id,modality,path,label\n", "header but no rows"),
        (b"\x89PNG\r\n\x1a\n\x00\xff" * 40, "not UTF-8"),
        ("patient_id,modality,path,label\nJos\xe9,DM,a.png,benign\n".encode("latin-1"), "UTF-8"),
        (
            b"patient_id,modality,path,label\n007,DM,gone1.png,benign\n008,US,gone2.png,malignant\n",
            "row 3, column path, patient '008', file 'gone2.png'",
        ),
    ],
)
@pytest.mark.parametrize("command", ["validate", "split"])
def test_bad_manifests_name_the_problem(tmp_path, capsys, command, content, expected):
    path = tmp_path / "manifest.csv"
    path.write_bytes(content)
    argv = [command, path] + (["--out", tmp_path / "s.json"] if command == "split" else [])
    code, err = _run(argv, capsys)
    assert code == 2 and str(path) in err and expected in err, err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--holdout", "1.5"], "--holdout must be a fraction in [0, 1) (got 1.5)"),
        (["--folds", "1"], "--folds must be an integer of at least 2 (got 1)"),
        (["--folds", "9"], "too few malignant patients for 9 folds: 8 left after a 0.2 holdout"),
    ],
)
def test_split_bad_options(synthetic_cohort, tmp_path, capsys, options, expected):
    code, err = _run(["split", synthetic_cohort, "--out", tmp_path / "s.json", *options], capsys)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "s.json").exists()


def test_directory_given_as_a_file(tmp_path, capsys):
    for argv in (
        ["validate", tmp_path],
        ["split", tmp_path, "--out", tmp_path / "s.json"],
        ["evaluate", tmp_path, "--out", tmp_path / "out"],
    ):
        code, err = _run(argv, capsys)
        assert code == 2 and str(tmp_path) in err, (argv, err)
