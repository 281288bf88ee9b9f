"""Progress of long loops when output is not a terminal: log lines, about every tenth, and the end."""

from __future__ import annotations

import logging

from finegrain.progress import track


def test_log_lines_when_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setenv("FINEGRAIN_PROGRESS", "1")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="finegrain.progress"):
        assert list(track(range(25), 25, "embedding gallery", min_seconds=0)) == list(range(25))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("embedding gallery: 2/25") and lines[-1].startswith("embedding gallery: 25/25 (100%)")
    assert len(lines) == 13  # every 2 of 25, and the last
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finegrain.progress"):
        assert list(track(range(25), 25, "fast", min_seconds=60)) == list(range(25))
    assert [r.getMessage()[:10] for r in caplog.records] == ["fast: 25/2"]  # a quick loop: its end only


def test_silenced_by_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("FINEGRAIN_PROGRESS", "0")
    with caplog.at_level(logging.INFO, logger="finegrain.progress"):
        assert list(track(iter("abc"), 3, "x")) == ["a", "b", "c"]
    assert not caplog.records
