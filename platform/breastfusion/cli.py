"""The ``breastfusion`` command line: a thin click group.

Subcommands live next to the code they drive and are imported only when invoked, so
``breastfusion --help`` never imports torch, ray or ultralytics. Each command parses its
options, calls typed functions, and prints; a ``UserError`` anywhere becomes one clear
message on stderr and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from breastfusion.errors import Terminated, UserError

# name -> ("module:attribute" of a click command, one-line help). The help text is listed
# here so that `breastfusion --help` needs no import of the (heavy) command modules.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "breastfusion.cli:run_command",
        "Run a whole study (STUDY.yaml) from data to report.",
    ),
    "synth": (
        "breastfusion.data.synthetic.cli:synth_command",
        "Generate the synthetic paired DM + US cohort.",
    ),
    "validate": (
        "breastfusion.data.cli:validate_command",
        "Check a manifest and summarise the cohort.",
    ),
    "split": (
        "breastfusion.data.cli:split_command",
        "Make the holdout and patient-level K folds.",
    ),
    "train": (
        "breastfusion.engine.cli:train_command",
        "Train one model on one fold (no Ray).",
    ),
    "evaluate": (
        "breastfusion.evaluate.cli:evaluate_command",
        "Patient-level metrics with CIs and DeLong tests.",
    ),
    "final": (
        "breastfusion.final.cli:final_command",
        "Refit the chosen configuration, evaluate once on the holdout, export a bundle.",
    ),
    "predict": (
        "breastfusion.predict.cli:predict_command",
        "Score new patients with an exported bundle (detector, preprocessing, model).",
    ),
    "aggregate": (
        "breastfusion.evaluate.cli:aggregate_command",
        "Study tables and the best configuration from search folders.",
    ),
    "report": ("breastfusion.report.cli:report_command", "Self-contained HTML report of a study."),
    "import": (
        "breastfusion.importers.cli:import_command",
        "Import a public data set into a manifest.",
    ),
    "search": (
        "breastfusion.distributed.cli:search_command",
        "Ray Tune + Optuna search over patient-level folds.",
    ),
    "roi": ("breastfusion.roi.cli:roi_group", "Ultrasound lesion detector (YOLOv8): train, crop."),
}


@click.command("run")
@click.argument("study", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Study folder (default: the study file's `out`, else ./<name>_out).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted search stage in place.")
@click.option(
    "--debug",
    is_flag=True,
    help="Same stages, minutes: fold 0 only, <= 2 trials per search, 1 epoch.",
)
def run_command(study: Path, out: Path | None, resume: bool, debug: bool) -> None:
    """Run the study in STUDY.yaml from data to report; finished stages are skipped."""
    from breastfusion.study import run_study

    run_study(study, out=out, resume=resume, debug=debug, echo=click.echo)


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when one is run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="breastfusion")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Multimodal (DM + US) breast lesion classification: data, training, search, evaluation."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("breastfusion").setLevel(min(level, logging.INFO))


def _on_sigterm(signum: int, frame: object) -> None:
    # A second SIGTERM while cleaning up after the first aborts at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the group, turning user errors into clean exits.

    Exit codes: 0 done, 2 user error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
    An interrupt is never success: commands mark nothing finished that did not finish.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(argv)
    finally:
        if previous is not None:  # in-process callers (tests, jobs) get their handler back
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="breastfusion", standalone_mode=False)
    except Terminated:
        click.echo("terminated (SIGTERM): nothing unfinished was marked done", err=True)
        return 143
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except OSError as exc:
        # Backstop: a filesystem problem the code did not anticipate still gets one line.
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        return 2
    except click.exceptions.Abort as exc:
        # click turns KeyboardInterrupt (and so Terminated) into Abort.
        if isinstance(exc.__cause__, Terminated):
            click.echo("terminated (SIGTERM): nothing unfinished was marked done", err=True)
            return 143
        click.echo("interrupted: nothing unfinished was marked done", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted: nothing unfinished was marked done", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
