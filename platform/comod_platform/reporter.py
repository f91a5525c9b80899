"""Epoch reports that do not stop training while the driver handles them.

A Ray Tune function trainable reports synchronously: ``tune.report`` puts
the result on a queue and blocks until the driver has processed it
(callbacks, scheduler, searcher) and asked for the next one. With several
reports per trial, and a driver shared by many trials, a trial spends that
round trip idle every epoch. Here a thread of the trial hands the reports
to Ray Tune one after the other, in order, while training goes on.

A trial the scheduler stops ends at its next optimisation step
(:meth:`EpochReporter.check` sees Ray's stop, or the reporting thread
ended by Ray at a report with ``SystemExit(0)``), well within the time Ray
gives a thread before it replaces the actor. A report
that fails (its checkpoint cannot be persisted, say) fails the training
thread at its next step, so Ray retries the trial as it would have.
"""
from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path
from typing import Callable


class EpochReporter:
    """Calls ``report(row, folder)`` for each :meth:`submit`, in order, from its own thread.

    ``folder`` (or None) is a staged checkpoint folder, deleted once it has been reported."""

    def __init__(self, report: Callable[[dict, Path | None], None], stopping: Callable[[], bool] | None = None):
        """``stopping``: whether Ray has asked the trial to stop (checked every step, so a stop that comes
        while no report is waiting ends training at once rather than at the next epoch's report)."""
        self._report = report
        self._stopping = stopping
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="comod-epoch-reports", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                row, folder = item
                if self._stopped.is_set():
                    continue  # stopped: nothing more goes to Ray, staged folders are still removed
                try:
                    self._report(row, folder)
                except SystemExit:  # Ray stops the trial at a report
                    self._stopped.set()
                except BaseException as err:  # noqa: BLE001 - raised again in the training thread
                    self._error = err
                    self._stopped.set()
            finally:
                if item is not None and item[1] is not None:
                    shutil.rmtree(item[1], ignore_errors=True)
                self._queue.task_done()

    def check(self) -> None:
        """In the training thread: end it if the trial was stopped, or raise the error of a report."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._stopped.is_set() or (self._stopping is not None and self._stopping()):
            self._stopped.set()
            raise SystemExit(0)  # Ray's graceful end of a trial's training thread

    def submit(self, row: dict, folder: Path | None = None) -> None:
        try:
            self.check()
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        self._queue.put((row, folder))

    def close(self) -> None:
        """Wait until every report went out (then :meth:`check`), and end the thread."""
        self._queue.join()
        self._queue.put(None)
        self._thread.join()
        self.check()

    def abandon(self) -> None:
        """End the thread after what is queued, without waiting (the training thread is failing anyway)."""
        self._stopped.set()
        self._queue.put(None)


__all__ = ["EpochReporter"]
