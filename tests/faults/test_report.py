"""The figures' page: one table per group, the last record of a fault wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults import figures, report


def test_records_of_both_groups_become_one_table_each_last_record_winning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "figures.jsonl"
    monkeypatch.setenv(figures.ENV, str(path))
    monkeypatch.setenv(figures.LONG_ENV, "1")
    figures.record(figures.Figures(group="cluster", fault="redis lost", requests=5))
    figures.record(figures.Figures(group="single node", fault="kill -9", requests=1))
    figures.record(
        figures.Figures(group="single node", fault="kill -9", requests=2, fd_drift=0, notes="x|y")
    )
    rows = report.load(path.read_text().splitlines())
    assert [(r["group"], r["requests"]) for r in rows] == [("cluster", 5), ("single node", 2)]
    page = report.render(rows)
    assert page.index("## Single node") < page.index("## Cluster")
    assert "| kill -9 | 2 |" in page and "| kill -9 | 1 |" not in page
    assert "x\\|y" not in page.split("## Single node")[1].split("Notes")[0]
    assert "make faults FAULTS=" in page
    assert "long run" in page
    assert json.loads(path.read_text().splitlines()[0])["long"] is True


def test_the_report_runs_as_a_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert report.main([str(path)]) == 0
    assert "# Reliability" in capsys.readouterr().out
    assert report.main([]) == 2
