"""The MLflow writer without Ray: ordered writes, outages waited out, refusals dropped loudly, and a real
SQLite store locked past its busy timeout counted as a passing failure."""
from __future__ import annotations

import logging
import sqlite3
import threading
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from comod_platform.writer import RetryingClient, Writer, retry_call, transient


class Flaky:
    """A call that fails with ``error`` its first ``failures`` times, then records its argument."""

    def __init__(self, failures: int, error: Exception, done: list):
        self.failures, self.error, self.done = failures, error, done
        self.calls = 0
        self.__name__ = "flaky"

    def __call__(self, value):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        self.done.append(value)


def test_writes_wait_out_an_outage_in_order():
    done: list = []
    writer = Writer(max_pause=0.05)
    first = Flaky(4, ConnectionError("connection refused"), done)
    writer.submit(first, "a")
    writer.submit(lambda v: done.append(v), "b")
    assert writer.flush(timeout=30)
    assert done == ["a", "b"] and first.calls == 5 and writer.dropped == 0 and writer.outage_since is None


def test_a_refused_write_is_dropped_with_a_warning_and_the_rest_go_on(caplog):
    done: list = []
    writer = Writer(retries=3, max_pause=0.01)
    refused = Flaky(99, MlflowException("INVALID_PARAMETER_VALUE: bad key"), done)
    with caplog.at_level(logging.WARNING, logger="comod_platform.writer"):
        writer.submit(refused, "x")
        writer.submit(lambda v: done.append(v), "after")
        assert writer.flush(timeout=30)
    assert refused.calls == 3 and writer.dropped == 1 and done == ["after"]
    assert any("refused 3 times, dropped" in r.getMessage() and "bad key" in r.getMessage() for r in caplog.records)


def test_flush_gives_up_after_its_timeout_while_the_server_is_away():
    writer = Writer(max_pause=0.05)
    writer.submit(Flaky(10**6, ConnectionError("down"), []), "never")
    started = time.monotonic()
    assert writer.flush(timeout=0.5) is False
    assert time.monotonic() - started < 5 and writer.pending() == 1


def test_retry_call_raises_a_refusal_at_once_and_an_outage_after_its_timeout():
    refusal = Flaky(1, ValueError("no"), [])
    with pytest.raises(ValueError):
        retry_call(refusal, 1, timeout=30)
    assert refusal.calls == 1
    outage = Flaky(10**6, TimeoutError("slow"), [])
    with pytest.raises(TimeoutError):
        retry_call(outage, 1, timeout=1.0)
    assert outage.calls >= 2


def test_a_sqlite_store_locked_past_its_busy_timeout_is_transient_and_waited_out(tmp_path, empty_store):
    """A real MLflow SQLite store, its database locked by another connection for longer than MLflow waits:
    the plain client's error (MLflow's wrapping of sqlite3's) counts as transient, and the retrying client's
    write goes through once the lock is gone."""
    import shutil

    path = tmp_path / "mlflow.db"
    shutil.copy(empty_store, path)
    uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments()  # the engine made before the lock
    holder = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    released = threading.Event()

    def release_later():
        time.sleep(25)  # longer than MLflow's 20 s busy timeout: the first retried attempt fails too
        holder.execute("COMMIT")
        holder.close()
        released.set()

    try:
        with pytest.raises(Exception) as locked:
            client.create_experiment("while-locked")
        assert transient(locked.value), repr(locked.value)
        threading.Thread(target=release_later, daemon=True).start()
        experiment_id = RetryingClient(client, timeout=120).create_experiment("after-the-lock")
        assert released.is_set() and client.get_experiment(experiment_id).name == "after-the-lock"
    finally:
        if not released.is_set():
            released.wait(60)


def test_what_is_not_transient():
    assert not transient(MlflowException("RESOURCE_DOES_NOT_EXIST: run 1 not found"))
    assert not transient(ValueError("bad"))
    assert transient(MlflowException("(sqlite3.OperationalError) database is locked"))
    wrapped = MlflowException("write failed")
    wrapped.__cause__ = type("OperationalError", (Exception,), {})("disk I/O error")
    assert transient(wrapped)


def test_the_mlflow_writer_of_a_search_runs_below_the_trials_priority(tmp_path):
    """A search's MLflow writer thread runs in Linux's idle class, below Ray's workers (nice 15)."""
    import os

    from comod_platform.trial_runs import TrialRuns

    runs = TrialRuns(None, "n", f"sqlite:///{tmp_path / 'mlflow.db'}", "0", "parent")
    seen = []
    runs.writer.submit(lambda: seen.append(os.sched_getscheduler(0)))
    assert runs.flush(10) and seen == [os.SCHED_IDLE]


def test_an_idle_writer_runs_only_where_a_core_would_idle():
    """``idle=True``: the writer's thread alone is in Linux's SCHED_IDLE class; the driver's threads keep
    the normal one."""
    import os

    from comod_platform.writer import Writer

    seen = []
    writer = Writer(idle=True, name="test-idle-writer")
    writer.submit(lambda: seen.append(os.sched_getscheduler(0)))
    assert writer.flush(10)
    assert seen == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    plain = Writer(name="test-plain-writer")
    plain.submit(lambda: seen.append(os.sched_getscheduler(0)))
    assert plain.flush(10) and seen[-1] == os.SCHED_OTHER


def test_a_flushed_writer_holds_nothing_of_its_calls():
    """Once a flush returns, the writer's thread keeps no reference to a call's arguments (a Ray trial
    freed in that thread while Ray shuts down would end the driver with status 1)."""
    import weakref

    class Payload:
        pass

    payload = Payload()
    gone = weakref.ref(payload)
    writer = Writer(name="test-writer")
    writer.submit(lambda value: None, payload)
    del payload
    assert writer.flush(10)
    assert gone() is None


def test_a_writer_counts_its_calls_and_the_cpu_they_took():
    """``usage()`` sums the writers of the process by thread name: calls made (a dropped one counts too)
    and their thread's CPU time, which a call that computes has and one that sleeps has not."""
    from comod_platform.writer import usage

    def compute():
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass

    busy, sleepy = Writer(name="test-busy-writer"), Writer(name="test-sleepy-writer")
    for _ in range(3):
        busy.submit(compute)
    sleepy.submit(time.sleep, 0.2)
    assert busy.flush(10) and sleepy.flush(10)
    counted = usage()
    assert counted["test-busy-writer"]["calls"] == 3 and counted["test-busy-writer"]["cpu_s"] >= 0.15
    assert counted["test-sleepy-writer"]["calls"] == 1 and counted["test-sleepy-writer"]["cpu_s"] < 0.05
    busy.submit(compute)
    assert busy.flush(10)
    later = usage(since=counted)  # only what came after: the one call, no idle writer
    assert set(later) == {"test-busy-writer"} and later["test-busy-writer"]["calls"] == 1
    assert 0.05 <= later["test-busy-writer"]["cpu_s"] < 0.15


def test_a_search_s_summary_says_what_its_writer_costs(tiny_search):
    """``comod search run --json``: the driver's MLflow writer, its calls and CPU seconds."""
    import json

    mlflow = json.loads(tiny_search["done"].stdout)["writers"]["comod-mlflow-writer"]
    assert mlflow["calls"] >= 2 * 4 and mlflow["cpu_s"] > 0  # tiny.yaml's 4 trials: at least a start and an end
