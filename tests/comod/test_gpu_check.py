"""benchmarks/gpu_check.py: its CPU dry run (``--device cpu --quick``, the same code paths as on a GPU) and
the derivation of its recommended settings."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
RESULT = re.compile(r"^RESULT det/plain_bf16=(\d+\.\d\d|nan) sto/det_bf16=(\d+\.\d\d|nan) pack4/pack1=(\d+\.\d\d|nan)$")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    return proc, out, time.perf_counter() - started


def test_the_cpu_dry_run_writes_every_section_and_ends_with_the_result_line(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 120, f"the dry run took {seconds:.0f} s; it must stay under 2 minutes"
    last = proc.stdout.strip().splitlines()[-1]
    match = RESULT.match(last)
    assert match, f"last line is not the RESULT line: {last!r}"
    assert match.group(3) == "nan"  # --quick packs 1 and 2 trials: 4 is not measured
    assert "not a GPU" in proc.stdout

    result = json.loads((out / "gpu_check_cpu.json").read_text())
    assert result["result"] == last
    correctness = result["correctness"]
    assert correctness["pass"] and correctness["cpu_vs_device"]["compared"].startswith("cpu vs cpu")
    assert set(correctness["cpu_vs_device"]["kinds"]) == {"deterministic", "stochastic"}
    assert correctness["gpu_tests"]["status"] in ("skipped", "passed")
    assert correctness["gpu_tests"]["reason"]  # why they did not run here

    rows = result["throughput"]["rows"]
    assert {(r["precision"], r["phase"]) for r in rows} == {
        (p, phase) for p in ("fp32", "bf16", "bf16_cl") for phase in ("pretrain", "finetune")}
    for r in rows:
        assert r["plain"] > 0 and r["comod"]["deterministic"] > 0 and r["comod"]["stochastic"] > 0
        assert r["det/plain"] > 0 and r["sto/det"] > 0 and r["flop_bound"] > 1
        assert ("none" in r["comod"]) == (r["phase"] == "pretrain")

    packing = result["packing"]
    assert [r["trials"] for r in packing["rows"]] == [1, 2]
    assert all(w["images_per_s"] > 0 for r in packing["rows"] for w in r["workers"])
    assert packing["pack4/pack1"] is None and packing["target"]["why_not"]

    rec = result["recommendation"]
    assert rec["measured_on_gpu"] is False
    assert rec["precision"] in ("fp32", "bf16") and rec["trials_per_gpu"] in (1, 2)
    assert rec["search.resources.gpu"] == pytest.approx(1 / rec["trials_per_gpu"], abs=1e-4)

    md = (out / "gpu_check_cpu.md").read_text()
    for heading in ("## Correctness", "## Trial throughput", "## Packing", "## Recommended settings"):
        assert heading in md
    tail = md[md.index("## Recommended settings"):]
    assert "##" not in tail[2:] and "not from GPU measurements" in tail and "search.resources.gpu" in tail


@pytest.fixture(scope="module")
def gpu_check():
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("benchmark_gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def _rows(fine: dict[str, float]) -> list[dict]:
    return [{"precision": p, "phase": "finetune", "comod": {"stochastic": v}} for p, v in fine.items()]


def _packing(totals: dict[int, float], mib: float) -> dict:
    return {"rows": [{"trials": n, "total_images_per_s": t,
                      "workers": [{"nvidia_smi_mib": mib, "images_per_s": t / n}] * n} for n, t in totals.items()]}


def test_recommended_trials_per_gpu_are_the_fewest_near_the_best_total_that_fit_in_memory(gpu_check):
    rows = _rows({"fp32": 4000.0, "bf16": 9000.0, "bf16_cl": 11000.0})
    totals = {1: 10000.0, 2: 19000.0, 4: 26000.0, 8: 27000.0}  # 4 is within 10% of the best, 2 is not
    rec = gpu_check.recommend(rows, _packing(totals, 8000.0), "cuda", 256, gpu_mib=81559.0)
    assert (rec["precision"], rec["channels_last"], rec["trials_per_gpu"]) == ("bf16", True, 4)
    assert rec["search.resources.gpu"] == 0.25 and rec["measured_on_gpu"]
    tight = gpu_check.recommend(rows, _packing(totals, 30000.0), "cuda", 256, gpu_mib=81559.0)
    assert tight["trials_per_gpu"] == 2  # 4 x 30 GiB does not fit in 90% of 80 GiB
    fp32 = gpu_check.recommend(_rows({"fp32": 5.0, "bf16": 4.0, "bf16_cl": 3.0}), _packing({1: 5.0}, 0), "cpu", 8,
                               gpu_mib=None)
    assert (fp32["precision"], fp32["channels_last"], fp32["trials_per_gpu"]) == ("fp32", False, 1)


def test_without_pytest_the_gpu_tests_are_reported_skipped_with_the_reason(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    tests = gpu_check.run_gpu_tests(timeout=10)
    assert tests["status"] == "skipped" and "pytest is not installed" in tests["reason"]
