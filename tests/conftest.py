"""Shared test settings: CPU only, no downloads, a private runs folder."""
import os

import pytest

os.environ.setdefault("COMOD_DOWNLOAD", "0")
# Tiny models: one thread is faster than two fighting over a small (or busy) machine,
# and subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import signal

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # A suite started in the background of a script inherits SIGINT ignored (POSIX shells do that to
    # background jobs), and so would every command a test starts: the tests that stop one with SIGINT,
    # as a terminal's Ctrl-C does, would wait for nothing. The commands get a terminal's default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _runs_home(tmp_path, monkeypatch):
    monkeypatch.setenv("COMOD_HOME", str(tmp_path / "comod-runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
