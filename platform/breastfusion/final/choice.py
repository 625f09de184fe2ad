"""Which configuration ``final`` exports: a search's choice, read through ``breastfusion.runs``.

``locate_best(best)`` accepts what the search and aggregation write about their choice:

- a mapping (the study passes ``aggregate.json``'s ``best`` / ``best_by_modality`` records,
  which carry ``search_dir``, ``trial`` and the full ``config``);
- a JSON file holding such a record (aggregation's choice, or a search's ``best.json``, which
  holds only the searched values: the full config then comes from the trial's folds);
- a search folder (its ``best.json``).

Nothing here names a search file: ``runs`` does (``SearchDir``, ``TrialDir``, ``FoldDir``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breastfusion import runs
from breastfusion.errors import UserError


@dataclass(frozen=True)
class Choice:
    """The chosen configuration and where its fold outputs live."""

    config: dict[str, Any]
    source: str
    trial: runs.TrialDir | None = None
    folds: tuple[runs.FoldDir, ...] = field(default_factory=tuple)

    @property
    def fold_dirs(self) -> list[Path]:
        return [f.path for f in self.folds]


def _is_full_config(config: Any) -> bool:
    return (
        isinstance(config, Mapping)
        and bool(config)
        and all(isinstance(v, Mapping) for v in config.values())
    )


def _record(best: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str, Path | None]:
    """(record, source for messages, search folder implied by the path)."""
    if isinstance(best, Mapping):
        return dict(best), "the chosen configuration record", None
    path = Path(best)
    if path.is_dir():
        search = runs.SearchDir(path)
        search.experiment()  # a clear error when this is not a search folder
        return search.best(), str(search.best_path), path
    record = runs.resolved(runs.read_json(path, "best-configuration record"), path.parent)
    implied = path.parent if path.name == runs.BEST_FILE else None
    return record, str(path), implied


def locate_best(
    best: str | Path | Mapping[str, Any], search_dir: str | Path | None = None
) -> Choice:
    """The chosen trial's config and fold folders (see module doc)."""
    record, source, implied = _record(best)
    if not record.get("trial"):
        note = record.get("note") or "no trial finished every fold"
        raise UserError(f"{source}: no chosen trial ({note})")
    root = search_dir or implied or record.get("search_dir")
    if not root:
        raise UserError(f"{source}: does not say which search folder it came from (search_dir)")
    trial = runs.SearchDir(Path(root)).trial(str(record["trial"]))
    if not trial.path.is_dir():
        raise UserError(f"{source}: the chosen trial's folder {trial.path} does not exist")
    folds = tuple(trial.folds())
    config = record.get("config")
    if not _is_full_config(config):  # a search's best.json: only the searched values
        config = trial.config()
        if config is None:
            raise UserError(f"{source}: no fold config under {trial.path} to rebuild the config")
    config = {k: dict(v) for k, v in dict(config).items() if k != "config_hash"}
    return Choice(config=config, source=source, trial=trial, folds=folds)


def choice_from_files(search_dir: Path | None, config_file: Path | None) -> Choice:
    """``breastfusion final --search`` / ``--config``: a search folder, a choice record
    (JSON), or a config YAML (with ``--search`` for its fold outputs)."""
    if config_file is None:
        if search_dir is None:
            raise UserError("give a search folder and/or a chosen configuration file")
        return locate_best(search_dir)
    if config_file.suffix.lower() in (".yaml", ".yml"):
        from breastfusion.config import load_yaml

        cfg = load_yaml(config_file).to_dict()
        if search_dir is None:
            return Choice(config=cfg, source=str(config_file))
        found = locate_best(search_dir)
        return Choice(config=cfg, source=str(config_file), trial=found.trial, folds=found.folds)
    return locate_best(config_file, search_dir)
