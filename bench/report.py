"""Result rows, targets, and the table printed to stdout and written as Markdown.

A row of the main table compares one metric between the three targets measured in
the same run: the distribution registry in proxy mode, nginx ``proxy_cache`` and
regmirror. The two ratios are regmirror ÷ distribution and regmirror ÷ nginx: for
rates (MiB/s, requests/s) higher is better, for times, bytes and memory lower is
better. Some targets compare with something else (the direct pull, one transfer at
the capped rate); the cell text then says so. Scenarios that compare other pairs
(cluster, workers) give their rows two value columns of their own names, and get a
table of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MISSING = "—"

# The main table's value and ratio columns.
PEERS: tuple[str, ...] = ("distribution proxy", "nginx", "regmirror", "rm/dist", "rm/nginx")


@dataclass(frozen=True)
class Values:
    """A row's numbers, for its target's check (``nginx`` is None in two-column rows)."""

    dist: float | None
    rm: float | None
    nginx: float | None = None


Check = Callable[[Values], "bool | None"]


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``text`` for the table, ``check`` on the row's values
    returns whether it is met (``None``: cannot tell)."""

    text: str
    check: Check | None = None

    def verdict(self, values: Values) -> str:
        if self.check is None:
            return self.text
        try:
            met = self.check(values)
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
    # False: the ratio columns stay empty (values not comparable, or only one side).
    show_ratio: bool = True
    nginx: float | None = None
    nginx_text: str | None = None
    # The value and ratio columns: ``PEERS`` (distribution, nginx, regmirror and two
    # ratios), or two value columns and one ratio (e.g. workers: 1 / workers: 2, whose
    # values are in ``dist`` and ``rm``). Rows with other columns get a table of their own.
    columns: tuple[str, ...] = PEERS

    @property
    def values(self) -> Values:
        return Values(self.dist, self.rm, self.nginx)

    def cells(self) -> list[str]:
        verdict = self.target.verdict(self.values) if self.target else ""
        if len(self.columns) == len(PEERS):
            return [
                self.scenario,
                self.metric,
                self._cell(self.dist, self.dist_text),
                self._cell(self.nginx, self.nginx_text),
                self._cell(self.rm, self.rm_text),
                self.ratio_text(self.dist),
                self.ratio_text(self.nginx),
                verdict,
            ]
        return [
            self.scenario,
            self.metric,
            self._cell(self.dist, self.dist_text),
            self._cell(self.rm, self.rm_text),
            self.ratio_text(self.dist),
            verdict,
        ]

    def _cell(self, value: float | None, text: str | None) -> str:
        if text is not None:
            return text
        return format_value(value, self.unit, self.digits)

    def ratio_text(self, other: float | None = None) -> str:
        """regmirror ÷ ``other`` (by default the distribution proxy's value)."""
        if other is None and len(self.columns) != len(PEERS):
            other = self.dist
        if not self.show_ratio or other is None or self.rm is None:
            return ""
        if other == 0:
            return "∞" if self.rm else "1.00x"
        return f"{self.rm / other:.2f}x"


def format_value(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def header(columns: tuple[str, ...]) -> list[str]:
    return ["scenario", "metric", *columns, "target"]


def _groups(rows: Sequence[Row]) -> list[list[Row]]:
    """Rows by their columns, one table each, in the order the columns first appear."""
    groups: dict[tuple[str, ...], list[Row]] = {}
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
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
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
    lines.append("|" + "|".join("---" for _ in table[0]) + "|")
    for r in table[1:]:
        lines.append("| " + " | ".join(_md_escape(c) for c in r) + " |")
    return "\n".join(lines)


# --- targets ---------------------------------------------------------------------


def rm_at_least(factor: float, peer: str = "dist") -> Check:
    """regmirror ≥ factor x the peer's value (``"dist"`` or ``"nginx"``)."""

    def check(v: Values) -> bool | None:
        other = v.nginx if peer == "nginx" else v.dist
        if other is None or v.rm is None:
            return None
        return v.rm >= factor * other

    return check


def rm_at_most_peer(factor: float, peer: str = "dist") -> Check:
    """regmirror ≤ factor x the peer's value (times: lower is better)."""

    def check(v: Values) -> bool | None:
        other = v.nginx if peer == "nginx" else v.dist
        if other is None or v.rm is None:
            return None
        return v.rm <= factor * other

    return check


def rm_at_least_value(limit: float) -> Check:
    """regmirror's value ≥ limit (absolute)."""

    def check(v: Values) -> bool | None:
        return None if v.rm is None else v.rm >= limit

    return check


def rm_at_most(limit: float) -> Check:
    """regmirror's value ≤ limit (absolute)."""

    def check(v: Values) -> bool | None:
        return None if v.rm is None else v.rm <= limit

    return check


def rm_between(low: float, high: float) -> Check:
    def check(v: Values) -> bool | None:
        return None if v.rm is None else low <= v.rm <= high

    return check


def all_of(*checks: Check) -> Check:
    """Met when every check is; ``None`` when one cannot tell and none failed."""

    def check(v: Values) -> bool | None:
        results = [c(v) for c in checks]
        if any(r is False for r in results):
            return False
        if any(r is None for r in results):
            return None
        return True

    return check
