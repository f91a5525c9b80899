"""Files a run reads back that may be damaged (a write cut short, a full disk), and the pretraining
cache's lock: one clear error naming the file, or a cache entry set aside and made again."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from comod.pretrain_cache import PRETRAIN_CODE_VERSION, entry_path, file_lock, pretrain_key
from comod.train import Callbacks, DamagedFile, load_checkpoint, run_experiment
from helpers import tiny_config


def test_a_damaged_checkpoint_names_the_file_and_the_fix(tmp_path):
    run_experiment(tiny_config(), tmp_path)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # cut short
    with pytest.raises(DamagedFile) as damaged:
        load_checkpoint(ckpt)
    assert str(ckpt) in str(damaged.value) and "--restart" in str(damaged.value)
    with pytest.raises(DamagedFile):
        run_experiment(tiny_config(), tmp_path)  # a resumed run refuses it too, naming it
    ckpt.write_text("not a checkpoint at all")
    with pytest.raises(DamagedFile, match="is damaged and cannot be read"):
        load_checkpoint(ckpt)


def test_a_damaged_cache_entry_is_set_aside_and_pretrained_again_once(tmp_path):
    cache = tmp_path / "cache"
    cfg = tiny_config()
    first = run_experiment(cfg, tmp_path / "first", pretrain_cache=cache)
    entry = entry_path(cache, cfg)
    entry.write_bytes(entry.read_bytes()[:100])
    steps: list[str] = []
    with pytest.warns(RuntimeWarning, match="set aside"):
        again = run_experiment(cfg, tmp_path / "second", pretrain_cache=cache,
                               callbacks=Callbacks(on_step=lambda phase, i, n: steps.append(phase)))
    assert "pretrain" in steps  # pretrained again, not read from the damaged entry
    assert again["test/mean_f1"] == pytest.approx(first["test/mean_f1"])  # the same seed, the same model
    aside = list(cache.glob(f"{entry.name}.damaged-*"))
    assert len(aside) == 1 and load_checkpoint(entry)["step"] > 0  # the new entry is whole
    steps.clear()
    run_experiment(cfg, tmp_path / "third", pretrain_cache=cache,
                   callbacks=Callbacks(on_step=lambda phase, i, n: steps.append(phase)))
    assert "pretrain" not in steps  # the remade entry serves the next run


def test_the_cache_key_includes_the_code_version(monkeypatch):
    import comod.pretrain_cache as cache

    key = pretrain_key(tiny_config())
    monkeypatch.setattr(cache, "PRETRAIN_CODE_VERSION", PRETRAIN_CODE_VERSION + 1)
    assert cache.pretrain_key(tiny_config()) != key


def test_the_cache_lock_says_who_it_waits_for_and_gives_up_after_its_timeout(tmp_path):
    entry = tmp_path / "pretrained-abc.pt"
    code = (f"import sys, time; sys.path[:0] = {sys.path!r}\nfrom pathlib import Path\n"
            f"from comod.pretrain_cache import file_lock\n"
            f"with file_lock(Path({str(entry)!r})):\n    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines: list[str] = []
        started = time.monotonic()
        with pytest.raises(TimeoutError) as gave_up:
            with file_lock(entry, on_wait=lines.append, timeout=2.0, poll=0.2):
                pass
        assert 2.0 <= time.monotonic() - started < 10
        assert lines and f"pid {holder.pid}" in lines[0] and "pretrained-abc.pt" in lines[0]
        assert f"pid {holder.pid}" in str(gave_up.value) and "delete" in str(gave_up.value)
    finally:
        holder.kill()
        holder.wait()
    with file_lock(entry, timeout=2.0):  # released with its holder
        pass
