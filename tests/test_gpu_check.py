"""benchmarks/gpu_check.py still runs where CI runs (no GPU): ``--quick``, GPU-only steps skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_quick_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--calls", "5"]
    command += ["--out", str(out), "--work", str(tmp_path / "work")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"float32", "mixed_float16", "xla"}
    for row in report["variants"].values():
        assert row["examples_per_second"] > 0 and 0 <= row["test_accuracy"] <= 1
        assert row["mfu_vs_measured"] > 0 and row["mfu_vs_datasheet"] is None  # no GPU: no datasheet
    assert report["flops_per_example"]["forward"] > 0
    assert report["same_accuracy"]["float32"]["difference"] == 0
    assert (Path(report["export"]["path"]) / "saved_model.pb").exists()
    assert report["latency"]["saved_model"]["batch1_p50_ms"] > 0
    skipped = {row["step"] for row in report["skipped"]}
    assert {"GPU training", "TF-TRT", "datasheet peak"} <= skipped
    assert "SKIPPED TF-TRT" in result.stdout


def test_datasheet_peak_by_device_name():
    h200 = {"gpu": True, "name": "NVIDIA H200", "tf32": True}
    assert gpu_check.datasheet_peaks(h200)["float32"] == gpu_check.PEAKS["H200"]["tf32"]
    assert gpu_check.datasheet_peaks({**h200, "tf32": False})["float32"] == gpu_check.PEAKS["H200"]["fp32"]
    assert (
        gpu_check.datasheet_peaks({"gpu": True, "name": "NVIDIA L4", "tf32": True})["mixed_float16"] == 121.0
    )
    assert gpu_check.datasheet_peaks({"gpu": True, "name": "Mystery GPU", "tf32": True}) is None
    assert gpu_check.datasheet_peaks({"gpu": False, "name": "x86_64"}) is None


def test_same_accuracy_uses_binomial_noise():
    rows = {
        "float32": {"test_accuracy": 0.90},
        "xla": {"test_accuracy": 0.88},
        "mixed_float16": {"test_accuracy": 0.70},
    }
    checked = gpu_check.same_accuracy(rows, test_examples=400)
    # 3 * sqrt(2 p (1-p) / n) at p = 0.89: 0.0664
    assert checked["xla"]["tolerance"] == pytest.approx(3 * (2 * 0.89 * 0.11 / 400) ** 0.5)
    assert checked["xla"]["within_noise"] and not checked["mixed_float16"]["within_noise"]


def test_without_tensorflow_it_says_so_and_writes_the_json(tmp_path):
    """A lent machine may have neither TF nor network for --install: a clear error, not a traceback."""
    out = tmp_path / "gpu_check.json"
    code = (
        "import runpy, sys; sys.modules['tensorflow'] = None; "  # `import tensorflow` now raises ImportError
        f"sys.argv = ['gpu_check.py', '--out', {str(out)!r}]; "
        f"runpy.run_path({str(REPO / 'benchmarks' / 'gpu_check.py')!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "TensorFlow does not import" in result.stdout
    assert "nothing checked" in json.loads(out.read_text())["error"]
