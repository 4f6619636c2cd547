"""Result rows, targets, and the table printed to stdout and written as Markdown.

A row compares one metric between the distribution registry in proxy mode and
regmirror, measured in the same run. ``ratio`` is always regmirror ÷ distribution:
for rates (MiB/s, requests/s) higher is better, for times, bytes and memory lower is
better. Some targets compare with something else (the direct pull, one transfer at
the capped rate); the cell text then says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MISSING = "—"


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``text`` for the table, ``check`` on the row's values
    (distribution, regmirror) returns whether it is met (``None``: cannot tell)."""

    text: str
    check: Callable[[float | None, float | None], bool | None] | None = None

    def verdict(self, dist: float | None, rm: float | None) -> str:
        if self.check is None:
            return self.text
        try:
            met = self.check(dist, rm)
        except (TypeError, ZeroDivisionError):
            met = None
        if met is None:
            return f"{self.text} (n/a)"
        return f"{self.text}: {'met' if met else 'MISSED'}"


@dataclass
class Row:
    scenario: str
    metric: str
    dist: float | None = None
    rm: float | None = None
    unit: str = ""
    digits: int = 2
    # Shown instead of the formatted numbers when set (e.g. "1.98x image").
    dist_text: str | None = None
    rm_text: str | None = None
    target: Target | None = None
    # False: the ratio column stays empty (values not comparable, or only one side).
    show_ratio: bool = True
    # The two value columns and the ratio's (rows with other columns get a table of
    # their own): the distribution proxy and regmirror, or workers: 1 and workers: 2.
    columns: tuple[str, str, str] = ("distribution proxy", "regmirror", "ratio rm/dist")

    def cells(self) -> list[str]:
        return [
            self.scenario,
            self.metric,
            self._cell(self.dist, self.dist_text),
            self._cell(self.rm, self.rm_text),
            self.ratio_text(),
            self.target.verdict(self.dist, self.rm) if self.target else "",
        ]

    def _cell(self, value: float | None, text: str | None) -> str:
        if text is not None:
            return text
        return format_value(value, self.unit, self.digits)

    def ratio_text(self) -> str:
        if not self.show_ratio or self.dist is None or self.rm is None:
            return ""
        if self.dist == 0:
            return "∞" if self.rm else "1.00x"
        return f"{self.rm / self.dist:.2f}x"


def format_value(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


HEADER = ["scenario", "metric", "distribution proxy", "regmirror", "ratio rm/dist", "target"]


def header(columns: tuple[str, str, str]) -> list[str]:
    return ["scenario", "metric", *columns, "target"]


def _groups(rows: Sequence[Row]) -> list[list[Row]]:
    """Rows by their columns, one table each, in the order the columns first appear."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault(row.columns, []).append(row)
    return list(groups.values()) or [[]]


def _table(rows: Sequence[Row]) -> list[list[str]]:
    columns = rows[0].columns if rows else Row("", "").columns
    return [header(columns), *(row.cells() for row in rows)]


def render_text(rows: Sequence[Row]) -> str:
    """Fixed-width tables for the terminal."""
    return "\n\n".join(_render_text(group) for group in _groups(rows))


def _render_text(rows: Sequence[Row]) -> str:
    table = _table(rows)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = []
    for n, r in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def render_markdown(rows: Sequence[Row]) -> str:
    return "\n\n".join(_render_markdown(group) for group in _groups(rows))


def _render_markdown(rows: Sequence[Row]) -> str:
    table = _table(rows)
    lines = ["| " + " | ".join(_md_escape(c) for c in table[0]) + " |"]
    lines.append("|" + "|".join("---" for _ in HEADER) + "|")
    for r in table[1:]:
        lines.append("| " + " | ".join(_md_escape(c) for c in r) + " |")
    return "\n".join(lines)


# --- targets ---------------------------------------------------------------------


def rm_at_least(factor: float) -> Callable[[float | None, float | None], bool | None]:
    """regmirror ≥ factor x distribution."""

    def check(dist: float | None, rm: float | None) -> bool | None:
        if dist is None or rm is None:
            return None
        return rm >= factor * dist

    return check


def rm_at_most(limit: float) -> Callable[[float | None, float | None], bool | None]:
    """regmirror's value ≤ limit (absolute)."""

    def check(dist: float | None, rm: float | None) -> bool | None:
        return None if rm is None else rm <= limit

    return check


def rm_between(low: float, high: float) -> Callable[[float | None, float | None], bool | None]:
    def check(dist: float | None, rm: float | None) -> bool | None:
        return None if rm is None else low <= rm <= high

    return check
