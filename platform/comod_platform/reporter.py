"""Epoch reports that do not stop training while the driver handles them.

``tune.report`` blocks until the driver has processed the result (callbacks, scheduler, searcher). Here a
thread of the trial hands the reports to Ray Tune in order while training goes on. A trial the scheduler
stops gets Ray's ``SystemExit(0)`` at its pending report, which ends training at its next optimisation step
(:meth:`EpochReporter.check`); a report that fails (its checkpoint cannot be persisted, say) fails training
there too, so Ray retries the trial as it would have.
"""
from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path
from typing import Callable


class EpochReporter:
    """Calls ``report(row, folder)`` for each :meth:`submit`, in order, from its own thread; ``folder`` (or
    None) is a staged checkpoint folder, deleted once it has been reported."""

    def __init__(self, report: Callable[[dict, Path | None], None]):
        self._report = report
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="comod-epoch-reports", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        for row, folder in iter(self._queue.get, None):
            try:
                if not self._stopped.is_set():  # stopped: nothing more goes to Ray; staged folders still go
                    self._report(row, folder)
            except SystemExit:  # Ray stops the trial at a report
                self._stopped.set()
            except BaseException as err:  # noqa: BLE001 - raised again in the training thread
                self._error = err
                self._stopped.set()
            finally:
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                self._queue.task_done()

    def check(self) -> None:
        """In the training thread: end it if the trial was stopped, or raise the error of a report."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._stopped.is_set():
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
        self._queue.put(None)  # after every report queued: the thread ends once they went out
        self._thread.join()
        self.check()

    def abandon(self) -> None:
        """End the thread after what is queued, without waiting (the training thread is failing anyway)."""
        self._stopped.set()
        self._queue.put(None)
