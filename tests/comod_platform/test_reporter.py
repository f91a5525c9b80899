"""EpochReporter: trials hand epoch reports to Ray Tune without waiting for the driver."""
from __future__ import annotations

import threading

import pytest

from comod_platform.reporter import EpochReporter


def test_reports_go_out_in_order_while_training_goes_on(tmp_path):
    release = threading.Event()
    seen = []

    def report(row, folder):
        release.wait(10)  # the driver is busy: a synchronous report would block here
        seen.append((row["epoch"], folder is not None and folder.exists()))

    reporter = EpochReporter(report)
    folders = []
    for epoch in range(1, 4):
        folder = tmp_path / f"staged{epoch}"
        folder.mkdir()
        folders.append(folder)
        reporter.submit({"epoch": epoch}, folder if epoch != 2 else None)
        reporter.check()  # training's next step: not stopped, nothing failed
    assert seen == []  # none has gone out yet, and training was never held up
    release.set()
    reporter.close()
    assert seen == [(1, True), (2, False), (3, True)]
    assert not any(f.exists() for f in (folders[0], folders[2]))  # staged folders removed once reported


def test_a_stop_at_a_report_ends_training_at_its_next_step(tmp_path):
    calls = []

    def report(row, folder):
        calls.append(row["epoch"])
        raise SystemExit(0)  # what Ray does at a report once the scheduler stopped the trial

    reporter = EpochReporter(report)
    reporter.submit({"epoch": 1})
    reporter._queue.join()
    with pytest.raises(SystemExit) as stop:
        reporter.check()
    assert stop.value.code == 0
    with pytest.raises(SystemExit):
        reporter.submit({"epoch": 2})
    assert calls == [1]


def test_a_failed_report_fails_the_training_thread(tmp_path):
    def report(row, folder):
        raise OSError("storage unreachable")

    reporter = EpochReporter(report)
    folder = tmp_path / "staged"
    folder.mkdir()
    reporter.submit({"epoch": 1}, folder)
    reporter._queue.join()
    with pytest.raises(OSError, match="storage unreachable"):
        reporter.check()
    assert not folder.exists()
    later = tmp_path / "later"
    later.mkdir()
    with pytest.raises(SystemExit):  # after a failure nothing more is reported
        reporter.submit({"epoch": 2}, later)
    assert not later.exists()
