"""The README must not go stale: its commands exist, its runnable blocks run, its facts match.

- Every fenced block whose info string is ``bash runnable`` is run with bash in a temporary
  folder (the venv's ``bin`` first on PATH) and must exit 0. Keep such blocks cheap.
- Every other ``breastfusion …`` command line in a code block or an inline code span of the
  README (and of ``docs/*.md``) is parsed against the click command tree: the subcommand path
  and every ``--option`` must exist, and a literal value of a choice option must be allowed.
- The README starts with ``make demo`` and ``make test``; no page refers to ``../shared``.
- The demo settings the README quotes ("Read from `jobs/demo.yaml` …") equal the file's.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = "bash runnable"
FENCE = re.compile(
    r"^(?P<fence>`{3,})(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S
)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
HELP = ("-h", "--help")
SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}


@dataclass(frozen=True)
class Block:
    info: str
    body: str
    line: int  # line number of the opening fence


def blocks(text: str) -> list[Block]:
    return [
        Block(m["info"].strip(), m["body"], text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


def prose(text: str) -> str:
    """The page without its fenced blocks (for inline code spans)."""
    return FENCE.sub("", text)


def command_lines(body: str) -> list[str]:
    """Shell lines of a block, with backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip()]


def breastfusion_words(line: str) -> list[str] | None:
    """The words after ``breastfusion`` when ``line`` runs it (after VAR=… prefixes), else None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words or Path(words[0]).name != "breastfusion":
        return None
    rest = []
    for w in words[1:]:
        if w in SHELL_STOP or w.startswith((">", "2>")):
            break
        rest.append(w)
    return rest


def _option_names(command: click.Command) -> dict[str, click.Parameter]:
    names: dict[str, click.Parameter] = {}
    for param in command.get_params(click.Context(command)):
        for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
            if opt.startswith("-"):
                names[opt] = param
    return names


def _takes_value(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and not param.is_flag and not param.count


def _placeholder(value: str) -> bool:
    return value.isupper() or any(c in value for c in "<>…[]") or value in ("...", "…")


def check_command(words: list[str]) -> list[str]:
    """Problems with ``breastfusion WORDS`` against the click tree (empty: fine)."""
    from breastfusion.cli import cli

    problems: list[str] = []
    command: click.Command = cli
    path = ["breastfusion"]
    i = 0
    while i < len(words):
        word = words[i].strip("[]")
        i += 1
        if not word or word in ("...", "…"):
            continue
        if word.startswith("-") and word != "-":
            name, _, inline = word.partition("=")
            if name in HELP:  # every command takes them (the group's context settings)
                continue
            options = _option_names(command)
            if name not in options:
                problems.append(f"{' '.join(path)}: no option {name}")
                continue
            param = options[name]
            if _takes_value(param):
                value = inline if inline else (words[i] if i < len(words) else "")
                if not inline:
                    i += 1
                problems += _check_choice(path, name, param, value.strip("[]"))
            continue
        if isinstance(command, click.Group):
            sub = command.get_command(click.Context(command), word)
            if sub is None:
                if not _placeholder(word):
                    problems.append(f"{' '.join(path)}: no command {word!r}")
                return problems
            command = sub
            path.append(word)
    return problems


def _check_choice(path: list[str], name: str, param: click.Parameter, value: str) -> list[str]:
    if not isinstance(param.type, click.Choice) or not value or _placeholder(value):
        return []
    allowed = [str(c) for c in param.type.choices]
    fold = (lambda s: s) if param.type.case_sensitive else str.lower
    bad = [v for v in value.split("|") if fold(v) not in {fold(a) for a in allowed}]
    return [f"{' '.join(path)} {name}: {v!r} is not one of {allowed}" for v in bad]


def page_commands(page: Path) -> list[tuple[str, list[str]]]:
    """(where, words) of every ``breastfusion`` command on a page."""
    text = page.read_text(encoding="utf-8")
    found = []
    for block in blocks(text):
        for line in command_lines(block.body):
            words = breastfusion_words(line)
            if words is not None:
                found.append((f"{page.name}:{block.line} block: {line}", words))
    for m in INLINE.finditer(prose(text)):
        words = breastfusion_words(m[1])
        if words is not None:
            found.append((f"{page.name} inline: {m[1]}", words))
    return found


# -- the checker itself can fail ------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ("breastfusion predict B --manifest M --out P --no-such-flag", "no option --no-such-flag"),
        ("breastfusion predikt B --out P", "no command 'predikt'"),
        ("breastfusion roi crop --manifest m.csv --out o --marginn 0.1", "no option --marginn"),
        ("breastfusion predict B --out P --backend tensorrt", "'tensorrt' is not one of"),
        ("breastfusion import busi S --out m.csv --near-duplicates group|merge", "'merge'"),
    ],
)
def test_the_checker_catches_wrong_commands(line, expected):
    words = breastfusion_words(line)
    assert words is not None
    problems = check_command(words)
    assert any(expected in p for p in problems), problems


def test_the_checker_accepts_right_commands():
    for line in (
        "breastfusion predict B/08_final/model --manifest m.csv --out P --backend onnxruntime",
        "RAY_ADDRESS=auto breastfusion -v run jobs/demo.yaml --out=demo_out --resume  # note",
        "breastfusion import busi S --out m.csv --near-duplicates group|report|off",
        "breastfusion roi train --manifest m.csv --out o --no-plots | tee log",
    ):
        assert check_command(breastfusion_words(line)) == [], line


# -- the pages ---------------------------------------------------------------------------------------


def test_every_breastfusion_command_on_the_pages_exists():
    found = [item for page in PAGES for item in page_commands(page)]
    assert len(found) >= 20  # the parser still finds the README's commands
    problems = [f"{where}\n    {p}" for where, words in found for p in check_command(words)]
    assert not problems, "\n".join(problems)


def test_readme_starts_with_make_demo_and_make_test():
    text = README.read_text(encoding="utf-8")
    first = blocks(text)[0]
    assert first.line < text.index("\n## "), "the set-up block must come before any section"
    commands = [shlex.split(line, comments=True) for line in command_lines(first.body)]
    assert [c for c in commands if c][:2] == [["make", "demo"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.parametrize(
    "page", [p.relative_to(ROOT).as_posix() for p in [*PAGES, ROOT / "CONTRIBUTING.md"]]
)
def test_no_page_refers_outside_the_repository(page):
    assert "../shared" not in (ROOT / page).read_text(encoding="utf-8")


def _lookup(data: object, dotted: str) -> object:
    """``a.b.c`` in nested mappings; a remaining dotted tail may be one key (``base``)."""
    parts = dotted.split(".")
    node = data
    while parts:
        if not isinstance(node, dict):
            return None
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in node:
                node, parts = node[key], parts[n:]
                break
        else:
            return None
    return node


def test_quoted_demo_settings_match_jobs_demo_yaml():
    text = README.read_text(encoding="utf-8")
    m = re.search(r"Read from `jobs/demo\.yaml`(?P<para>.*?)(?:\n\n|$)", text, re.S)
    assert m, "the README no longer quotes jobs/demo.yaml's settings"
    quoted = re.findall(r"`([a-z_][\w.]*): ([^`]+)`", m["para"])
    assert any(k == "base.data.pairs_per_patient" for k, _ in quoted), quoted
    demo = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text(encoding="utf-8"))
    wrong = [
        f"{key}: README says {value!r}, jobs/demo.yaml has {_lookup(demo, key)!r}"
        for key, value in quoted
        if yaml.safe_load(value) != _lookup(demo, key)
    ]
    assert not wrong, "\n".join(wrong)


# -- runnable blocks --------------------------------------------------------------------------------


def _runnable() -> list[Block]:
    return [b for b in blocks(README.read_text(encoding="utf-8")) if b.info == RUNNABLE]


def test_the_readme_has_runnable_blocks():
    assert _runnable(), f"no ```{RUNNABLE} block left in the README"


@pytest.mark.parametrize("block", _runnable(), ids=lambda b: f"line{b.line}")
def test_runnable_block(block: Block, tmp_path: Path):
    bindir = Path(sys.executable).parent
    assert (bindir / "breastfusion").exists(), f"no breastfusion script next to {sys.executable}"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "2")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.body],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (
        f"README.md block at line {block.line} failed (exit {done.returncode}):\n"
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
