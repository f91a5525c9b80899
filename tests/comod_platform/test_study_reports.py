"""The committed study reports agree with their trial tables: the numbers the README and docs/method.md
quote come out of benchmarks/pretraining_length.py run on the two searches' exported trials."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def test_the_pretraining_length_comparison_reproduces_the_quoted_numbers(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pretraining_length.py", str(RESULTS / "fashion_mnist_study" / "trials.parquet"),
                                      str(RESULTS / "fashion_mnist_long" / "trials.parquet")])
    module = runpy.run_path(str(REPO / "benchmarks" / "pretraining_length.py"))
    assert module["main"]() == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "RESULT delta_test_f1_short=+0.0180 delta_test_f1_long=+0.0039 change=-0.0141"
    assert out == (RESULTS / "fashion_mnist_long" / "pretraining_length.txt").read_text()
