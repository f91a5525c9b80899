"""A trial's epoch reports: made from the training thread, a stop or a failure at a report ends training there,
and a staged checkpoint folder never outlives its report."""
from __future__ import annotations

from pathlib import Path

import pytest
from ray import tune

from comod_platform import trainable
from comod_platform.conventions import FINAL_FLAG, METRICS, STEP


def _staged(tmp_path):
    out = tmp_path / "trial"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"weights")
    (out / "config.yaml").write_text("name: x\n")
    return trainable._stage(out, trainable.CHECKPOINT_FILES)


def test_a_report_carries_its_checkpoint_and_packed_metrics_then_its_folder_goes(tmp_path, monkeypatch):
    seen = []

    def report(metrics, checkpoint=None):  # what Ray Tune's tune.report receives
        seen.append((metrics, sorted(p.name for p in Path(checkpoint.path).iterdir())))

    monkeypatch.setattr(tune, "report", report)
    folder = _staged(tmp_path)
    trainable._report_to_tune({"val/mean_f1": 0.5, "pretrain/train_loss": 1.0, STEP: 3}, folder, "val/mean_f1")
    (metrics, files), = seen
    assert metrics["val/mean_f1"] == 0.5 and metrics[STEP] == 3 and FINAL_FLAG not in metrics
    assert '"pretrain/train_loss": 1.0' in metrics[METRICS]  # the rest packed as one JSON text
    assert files == ["checkpoint.pt", "config.yaml"] and not folder.exists()


@pytest.mark.parametrize("raised", [SystemExit(0), OSError("storage unreachable")])
def test_a_stop_or_a_failed_report_ends_training_in_that_call(tmp_path, monkeypatch, raised):
    """Ray stops a trial the scheduler ended with SystemExit(0) at its report; a report whose checkpoint cannot
    be persisted raises. Either reaches the training thread at once, and the staged folder is gone."""
    def report(metrics, checkpoint=None):
        raise raised

    monkeypatch.setattr(tune, "report", report)
    folder = _staged(tmp_path)
    with pytest.raises(type(raised)):
        trainable._report_to_tune({"val/mean_f1": 0.5}, folder, "val/mean_f1")
    assert not folder.exists()
