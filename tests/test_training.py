"""mmtf train / evaluate on real files, tiny configs."""

import json

import numpy as np
import pytest

from multimodal_tf import cli
from multimodal_tf.testing import tiny_config
from multimodal_tf.training import train
from tests.conftest import shared_manifest


@pytest.fixture(scope="module")
def trained_run(synth_manifest, tmp_path_factory):
    """One tiny run on the synthetic set, shared by the checks below."""
    out = tmp_path_factory.mktemp("run")
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={out}",
        "train.epochs=3",
        "model.fusion.name=gated",
    )
    return train(config, progress=False)


def test_run_directory_holds_config_checkpoints_history_and_curves(trained_run):
    for name in (
        "config.yaml",
        "metadata.json",
        "checkpoints/best.weights.h5",
        "checkpoints/last.weights.h5",
        "history.json",
        "history.csv",
        "learning_curves.png",
        "metrics.json",
    ):
        assert (trained_run / name).exists(), name
    history = json.loads((trained_run / "history.json").read_text())
    assert len(history["loss"]) == 3 and "val_accuracy" in history and "examples_per_second" in history
    assert any((trained_run / "logs").rglob("events.out.tfevents.*"))


def test_evaluate_writes_report_with_metrics_plots_and_ablation(trained_run, capsys):
    assert cli.main(["evaluate", str(trained_run)]) == 0
    report = json.loads((trained_run / "report.json").read_text())
    metrics = report["metrics"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and set(metrics) >= {
        "macro_f1",
        "log_loss",
        "roc_auc",
        "per_class",
    }
    assert len(metrics["per_class"]) == 8
    settings = [r["setting"] for r in report["ablation"]]
    assert settings == [
        "all",
        "without image",
        "without text",
        "without audio",
        "only image",
        "only text",
        "only audio",
    ]
    for plot in report["plots"].values():
        assert (trained_run / plot).stat().st_size > 1000
    markdown = (trained_run / "report.md").read_text()
    assert "## Modality ablation" in markdown and "macro-F1" in markdown
    assert "accuracy" in capsys.readouterr().out


def test_same_seed_gives_the_same_metrics(synth_manifest, tmp_path):
    histories = []
    for name in ("a", "b"):
        config = tiny_config(
            f"data.manifest={synth_manifest}", f"train.output_dir={tmp_path / name}", "train.epochs=2"
        )
        histories.append(json.loads((train(config, progress=False) / "history.json").read_text()))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(histories[0][key], histories[1][key], rtol=1e-6, err_msg=key)


def test_mirrored_strategy_over_two_logical_cpus_trains(synth_manifest, tmp_path):
    config = tiny_config(
        f"data.manifest={synth_manifest}", f"train.output_dir={tmp_path}", "train.strategy=mirrored"
    )
    run = train(config, progress=False)
    assert np.isfinite(json.loads((run / "history.json").read_text())["loss"]).all()


def test_unimodal_run_and_comparison_table(synth_manifest, trained_run, tmp_path):
    config = tiny_config(
        f"data.manifest={synth_manifest}", f"train.output_dir={tmp_path}", "model.modalities=[image]"
    )
    single = train(config, progress=False)
    assert cli.main(["evaluate", str(trained_run), "--compare", str(single), "--no-ablation"]) == 0
    report = json.loads((trained_run / "report.json").read_text())
    assert [r["modalities"] for r in report["comparison"]] == [["image", "text", "audio"], ["image"]]


def test_small_model_learns_real_avmnist_well_above_chance(tmp_path):
    manifest = shared_manifest("avmnist")
    config = tiny_config(
        f"data.manifest={manifest}",
        f"train.output_dir={tmp_path}",
        "model.modalities=[image, audio]",
        "data.image.height=28",
        "data.image.width=28",
        "data.image.channels=1",
        "data.audio.duration_seconds=1.0",
        "data.batch_size=32",
        "train.epochs=3",
        "train.learning_rate=0.003",
        "model.fusion.name=concat",
    )
    run = train(config, progress=False)
    test_accuracy = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
    assert test_accuracy > 0.5, test_accuracy  # chance is 0.1
