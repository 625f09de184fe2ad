"""One table schema for every rendering: ``Table`` → Markdown (``to_markdown``) or HTML
(``to_html``). Builders (``report.cv``, ``report.holdout``) fill a ``Table`` once; both
writers render the same cells, so a Markdown file and the HTML page can never disagree.

Cells hold plain text; the HTML writer escapes every character of it. Number formatting
lives here too: AUCs and proportions with 3 decimals (proportions as per cent with 1), small
numbers such as thresholds and p-values with ``%.3g`` so that 4.5e-7 never prints as 0.000.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cell:
    """``text`` with an optional second line ``sub`` (a CI, an SD), shown under it in HTML and
    after it in Markdown (in brackets unless ``inline``); ``code`` renders as code."""

    text: str
    sub: str = ""
    inline: bool = False
    code: bool = False
    flag: bool = False  # a warning-style cell (degenerate, unreachable)


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...] = ()
    notes: tuple[str, ...] = ()
    empty: str = "nothing to show"
    kind: str = ""  # a CSS class ("metrics")


def cell(value: Any) -> Cell:
    return value if isinstance(value, Cell) else Cell(text=plain(value))


# -- numbers ------------------------------------------------------------------------------------


def _bad(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def plain(v: Any) -> str:
    if _bad(v):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return small(v)
    return str(v)


def f3(v: Any) -> str:
    """AUC-like numbers: 3 decimals."""
    return "n/a" if _bad(v) else f"{float(v):.3f}"


def small(v: Any) -> str:
    """Thresholds, p-values, slopes: 3 significant digits (4.5e-07, 9.04e-05, 0.0)."""
    return "n/a" if _bad(v) else f"{float(v):.3g}"


def pct(v: Any) -> str:
    return "n/a" if _bad(v) else f"{100 * float(v):.1f}"


def interval(d: Mapping[str, Any] | None, *, percent: bool = False) -> Cell:
    """``{"value", "ci_low", "ci_high"}`` → value with its interval as the second line."""
    d = d or {}
    fmt = pct if percent else f3
    if _bad(d.get("value")):
        return Cell("n/a")
    lo, hi = d.get("ci_low"), d.get("ci_high")
    sub = "" if _bad(lo) or _bad(hi) else f"{fmt(lo)}–{fmt(hi)}"
    return Cell(fmt(d["value"]), sub)


def mean_sd(mean: Any, sd: Any) -> Cell:
    return Cell(f3(mean), f"± {f3(sd)}", inline=True)


def flagged(text: str, sub: str = "") -> Cell:
    return Cell(text, sub, flag=True)


# -- Markdown -----------------------------------------------------------------------------------


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_cell(c: Cell) -> str:
    text = f"`{c.text}`" if c.code else c.text
    if c.sub:
        text += f" {c.sub}" if c.inline else f" ({c.sub})"
    return _md(text)


def to_markdown(table: Table, level: int = 2) -> str:
    head = f"{'#' * level} {table.title}\n\n"
    if not table.rows:
        return head + f"{table.empty}\n"
    lines = ["| " + " | ".join(_md(c) for c in table.columns) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    notes = "".join(f"\n{n}\n" for n in table.notes)
    return head + "\n".join(lines) + "\n" + notes


# -- HTML ---------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_cell(c: Cell) -> str:
    text = f"<code>{esc(c.text)}</code>" if c.code else esc(c.text)
    if c.flag:
        text = f'<span class="flag">{text}</span>'
    if c.sub:
        text += f'<br><span class="ci">{esc(c.sub)}</span>'
    return f"<td>{text}</td>"


def to_html(table: Table, level: int = 3, *, title: bool = True) -> str:
    head = f"<h{level}>{esc(table.title)}</h{level}>" if title and table.title else ""
    if not table.rows:
        return head + f'<p class="missing">{esc(table.empty)}</p>'
    cols = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in table.rows)
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in table.notes)
    return (
        f'{head}<div class="tablewrap"><table class="{esc(table.kind)}"><thead><tr>{cols}'
        f"</tr></thead><tbody>{body}</tbody></table></div>{notes}"
    )


def make(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    notes: Sequence[str] = (),
    empty: str = "nothing to show",
    kind: str = "",
) -> Table:
    return Table(
        title,
        tuple(columns),
        tuple(tuple(cell(c) for c in r) for r in rows),
        tuple(notes),
        empty,
        kind,
    )
