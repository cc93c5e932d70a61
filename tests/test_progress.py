"""flows.Progress: one progress report for one-shot syncs and replays (a rich bar or log lines)."""

from __future__ import annotations

import logging
import sys

import pytest

from flows import Progress

LOGGER = "flows.progress"


def test_log_lines_give_the_share_the_rate_and_a_note_at_the_end(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress = Progress("job", total=200, done=50, unit="rows", bar=False, every=0)
        progress.advance(50)
        progress.close("stopped", done=120)
    first, last = (r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert first.startswith("job: 100/200 rows (50.0%), ") and " rows/s" in first
    assert last.startswith("job: 120/200 rows (60.0%), ") and "(stopped after " in last


def test_an_unknown_total_has_no_share_and_no_eta(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress = Progress("job", unit="lines", bar=False, every=None)
        progress.update(7)
        progress.close()
    assert not caplog.records  # every=None: no lines
    assert progress.line().startswith("job: 7 lines, ") and "ETA" not in progress.line()


def test_lines_wait_for_their_interval(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress = Progress("job", total=10, bar=False, every=3600.0)
        for _ in range(10):
            progress.advance(1)
        assert not caplog.records
        progress.close()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["job: 10/10 items (100.0%)"]


def test_a_bar_goes_to_stderr_and_logs_nothing(capsys, caplog):
    pytest.importorskip("rich")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress = Progress("job", total=4, unit="symbols", bar=True)
        assert progress.shows_bar
        progress.advance(4)
        progress.close()
    assert "job" in capsys.readouterr().err and not caplog.records


def test_without_rich_a_bar_falls_back_to_log_lines(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # the import fails
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress = Progress("job", total=2, bar=True)
        assert not progress.shows_bar
        progress.advance(2)
        progress.close()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["job: 2/2 items (100.0%)"]
