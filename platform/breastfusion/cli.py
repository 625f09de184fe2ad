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
import sys

import click

from breastfusion.errors import UserError

# name -> "module:attribute" of a click command. Add a line here to add a subcommand.
COMMANDS: dict[str, str] = {
    "synth": "breastfusion.data.synthetic:synth_command",
    "validate": "breastfusion.data.manifest:validate_command",
    "split": "breastfusion.data.splits:split_command",
    "train": "breastfusion.engine.train_cli:train_command",
    "evaluate": "breastfusion.evaluate.cli:evaluate_command",
    "import": "breastfusion.importers.cli:import_command",
    "roi": "breastfusion.roi.cli:roi_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="breastfusion")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Multimodal (DM + US) breast lesion classification: data, training, search, evaluation."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("breastfusion").setLevel(min(level, logging.INFO))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the group, turning user errors into clean exits."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        cli.main(args=argv, prog_name="breastfusion", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
