"""The ``mmtf`` command line: help without TensorFlow, no TF start-up noise, one parser per command."""

import subprocess
import sys
from pathlib import Path

import pytest

from multimodal_tf.cli import tune as tune_cli
from multimodal_tf.cli.common import IMPORT_NOISE

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (
    "data",
    "train",
    "distill",
    "evaluate",
    "export",
    "serve",
    "predict",
    "tune",
    "optimize",
    "index",
    "launch",
    "demo",
)
# Prints whether TensorFlow was imported after `mmtf ARGS` ran (help exits via SystemExit).
PROBE = (
    "import sys\nfrom multimodal_tf.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "print('tensorflow imported:', 'tensorflow' in sys.modules)"
)


def run_cli(*argv, probe=False, timeout=300):
    command = (
        [sys.executable, "-c", PROBE, *argv] if probe else [sys.executable, "-m", "multimodal_tf.cli", *argv]
    )
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("argv", [(), *((c,) for c in COMMANDS)], ids=["mmtf", *COMMANDS])
def test_help_does_not_import_tensorflow(argv):
    result = run_cli(*argv, "--help", probe=True)
    assert "usage: mmtf" in result.stdout, result.stderr
    assert "tensorflow imported: False" in result.stdout
    assert result.stderr == ""


def test_a_command_that_loads_tensorflow_prints_none_of_its_start_up_lines(tmp_path):
    result = run_cli("data", "synth", str(tmp_path / "synth"), "--num-examples", "12")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    assert not IMPORT_NOISE.search(result.stderr), result.stderr
    assert "Unable to register" not in result.stderr and "oneDNN" not in result.stderr


def test_the_noise_filter_keeps_other_lines():
    assert IMPORT_NOISE.search(
        "E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:485] Unable to register cuFFT factory"
    )
    assert not IMPORT_NOISE.search("E tensorflow/core/framework/op_kernel.cc] OOM when allocating tensor")


def test_absl_lines_logged_before_initialization_follow_tf_cpp_min_log_level(monkeypatch):
    # TF >= 2.20 prints absl-format lines before absl::InitializeLog() whatever
    # TF_CPP_MIN_LOG_LEVEL says; the quiet import applies the level itself.
    from multimodal_tf.cli.common import import_noise

    info = "I0000 00:00:1796121671.485703    2265 port.cc:153] some information"
    warning = "W0000 00:00:1796121671.485703    2265 loader.cc:12] a warning"
    error = "E0000 00:00:1796121671.485703    2265 kernel.cc:9] OOM when allocating tensor"
    for level, dropped in [("0", ()), ("1", (info,)), ("2", (info, warning)), ("3", (info, warning, error))]:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
        assert {line for line in (info, warning, error) if import_noise(line)} == set(dropped), level
    assert not import_noise("mmtf train: error: no such file")


def test_tune_choices_are_the_tuning_modules_tuners():
    from multimodal_tf import tuning

    assert tune_cli.TUNER_CHOICES == tuning.TUNERS


def test_a_config_error_exits_2_with_one_line(tmp_path):
    result = run_cli("train", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("mmtf train: error:") and "missing.yaml" in result.stderr


def test_demo_config_ships_in_the_package():
    from multimodal_tf import demo

    assert demo.DEMO_CONFIG.is_file() and "multimodal_tf" in demo.DEMO_CONFIG.parts
    assert demo.demo_config(["data.manifest=x.csv"]).name == "demo"
    assert "configs/*.yaml" in (REPO / "setup.cfg").read_text()


def test_a_missing_demo_config_is_an_error_not_defaults(monkeypatch, tmp_path):
    from multimodal_tf import demo

    monkeypatch.setattr(demo, "DEMO_CONFIG", tmp_path / "demo.yaml")
    with pytest.raises(FileNotFoundError, match="demo.yaml"):
        demo.demo_config()


# The quick start's main job end to end (~1-2 min on 2 cores): with the slow tests, which CI runs.
@pytest.mark.slow
def test_mmtf_demo_runs_end_to_end_on_a_small_synthetic_set(tmp_path):
    out = tmp_path / "demo"
    # A generous limit: on a loaded 2-core machine the job took over 5 minutes.
    result = run_cli(
        "demo", "--out", str(out), "--num-examples", "160", "--set", "train.epochs=2", timeout=1200
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in ("1/6 synthetic dataset", "2/6 convert + train", "3/6 evaluate", "4/6 export"):
        assert f"=== {step} ===" in result.stdout
    assert "=== 6/6 done in" in result.stdout and "gRPC and REST agree" in result.stdout
    assert len((out / "data" / "manifest.csv").read_text().splitlines()) == 161
    assert (out / "run" / "report.md").exists() and (
        out / "models" / "mmtf_demo" / "1" / "saved_model.pb"
    ).exists()
