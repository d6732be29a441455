"""mmtf tune: search space -> config overrides, random search, distributed search."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from multimodal_tf import cli, launch, tuning
from multimodal_tf import config as config_lib
from multimodal_tf.config import ConfigError
from multimodal_tf.data.cache import prepare_data
from multimodal_tf.models import build_model
from multimodal_tf.registry import FUSIONS
from multimodal_tf.serving.local import LocalModel
from multimodal_tf.testing import tiny_config

SPACE = {
    "fusion": {"type": "choice", "values": ["concat", "gated"], "key": "model.fusion.name"},
    "learning_rate": {
        "type": "float",
        "min": 1e-3,
        "max": 1e-2,
        "sampling": "log",
        "key": "train.learning_rate",
    },
    "dropout_rate": {
        "type": "float",
        "min": 0.0,
        "max": 0.2,
        "step": 0.1,
        "key": ["model.head.dropout_rate", "model.fusion.dropout_rate"],
    },
    "batch_size": {"type": "choice", "values": [8, 16], "key": "data.batch_size"},
}


def search_config(manifest, *overrides):
    """Tiny image-only config with SPACE (image keeps trials fast on two cores)."""
    config = tiny_config(
        f"data.manifest={manifest}", "model.modalities=[image]", "train.epochs=1", *overrides
    )
    return dataclasses.replace(config, search_space=SPACE)


def read_trials(project_dir):
    with open(project_dir / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_values_are_written_to_every_key():
    config = tiny_config()
    values = {"fusion": "gated", "learning_rate": 1e-4, "dropout_rate": 0.2, "batch_size": 16}
    tuned = tuning.apply_values(config, SPACE, values)
    assert tuned.model.fusion.name == "gated" and tuned.train.learning_rate == pytest.approx(1e-4)
    assert tuned.model.head.dropout_rate == tuned.model.fusion.dropout_rate == pytest.approx(0.2)
    assert tuned.data.batch_size == 16


def test_bad_search_space_specs_name_the_hyperparameter():
    kt = tuning.kt
    with pytest.raises(ConfigError, match="search_space.width.*type"):
        tuning.declare(kt.HyperParameters(), "width", {"type": "range", "key": "model.fusion.hidden_dim"})
    with pytest.raises(ConfigError, match="search_space.width.key"):
        tuning.declare(kt.HyperParameters(), "width", {"type": "int", "min": 8, "max": 16})
    with pytest.raises(ConfigError, match="model.fusion.widht"):
        tuning.apply_values(tiny_config(), {"w": {"type": "int", "key": "model.fusion.widht"}}, {"w": 8})


def test_default_search_space_covers_every_fusion_and_builds(tmp_path):
    config = tiny_config("model.modalities=[image]")
    space = tuning.default_search_space(config)
    assert space["fusion"]["values"] == FUSIONS.keys() and len(FUSIONS.keys()) >= 6
    assert {
        "image_width",
        "image_depth",
        "dropout_rate",
        "modality_dropout",
        "learning_rate",
        "batch_size",
    } <= set(space)
    for fusion in FUSIONS.keys():
        values = {name: spec.get("values", [spec.get("min")])[0] for name, spec in space.items()}
        values["fusion"] = fusion
        model = build_model(tuning.apply_values(config, space, values), num_classes=4, vocab_size=20)
        assert model.output_shape == (None, 4)


def test_pipelines_search_space_spells_out_the_default_for_three_modalities():
    root = Path(__file__).resolve().parents[1]
    config = config_lib.load([root / "pipelines" / "emoji3.yaml", root / "pipelines" / "search_space.yaml"])
    assert config.search_space == tuning.default_search_space(config)


@pytest.mark.slow
def test_random_search_writes_sorted_reports_and_resumes(synth_manifest, tmp_path):
    config = search_config(synth_manifest)
    result = tuning.tune(config, "random", max_trials=3, directory=tmp_path, progress=False)
    assert result.num_trials == 3
    assert result.epochs_trained == 3  # one epoch per trial (train.epochs=1): the budget is counted
    rows = read_trials(result.project_dir)
    assert [int(r["epochs"]) for r in rows] == [1, 1, 1]
    assert [r["status"] for r in rows] == ["COMPLETED"] * 3
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and result.best_score == pytest.approx(scores[0])
    assert "| trial |" in (result.project_dir / "trials.md").read_text()
    assert (result.project_dir / "objective.png").stat().st_size > 1000
    best = config_lib.load([result.best_config])
    assert best.model.fusion.name == rows[0]["fusion"] and best.data.batch_size == int(rows[0]["batch_size"])
    assert best.train.output_dir == str(result.project_dir / "best_run")

    again = tuning.tune(config, "random", max_trials=4, directory=tmp_path, progress=False)
    assert again.num_trials == 4  # the first three were reloaded, not re-run
    assert again.epochs_trained == 4  # the resumed search counts the reloaded trials' epochs too
    old = {r["trial"]: r["score"] for r in rows}
    assert {r["trial"]: r["score"] for r in read_trials(again.project_dir) if r["trial"] in old} == old


@pytest.mark.slow
def test_two_tuner_workers_search_and_the_chief_records_every_trial(synth_manifest, tmp_path):
    prepare_data(tiny_config(f"data.manifest={synth_manifest}").data, progress=False)
    config = search_config(synth_manifest, "name=distributed", "train.verbose=2")
    config_lib.save(config, tmp_path / "tune.yaml")
    command = [
        "mmtf",
        "tune",
        "--config",
        str(tmp_path / "tune.yaml"),
        "--max-trials",
        "4",
        "--directory",
        str(tmp_path / "results"),
    ]
    code = launch.launch(command, tuner_workers=2, log_dir=tmp_path / "logs", timeout=300, echo_chief=False)
    assert code == 0, (tmp_path / "logs" / "chief-0.log").read_text()[-3000:]
    rows = read_trials(tmp_path / "results" / "distributed")
    assert len(rows) == 4 and all(r["status"] == "COMPLETED" for r in rows)
    assert (tmp_path / "results" / "distributed" / "best_config.yaml").exists()
    # One "val_accuracy" line per trial epoch (1 each): the trials were shared.
    logs = [(tmp_path / "logs" / f"tuner-{i}.log").read_text() for i in range(2)]
    epochs_run = [log.count("val_accuracy:") for log in logs]
    assert sum(epochs_run) == 4 and min(epochs_run) >= 1, epochs_run
    assert all("done" in log for log in logs)


def assert_search_recorded(project_dir, num_trials):
    """Every trial completed with its objective (val_accuracy) recorded; the report is sorted."""
    rows = read_trials(project_dir)
    assert len(rows) == num_trials and all(r["status"] == "COMPLETED" for r in rows), rows
    scores = [float(r["score"]) for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)
    assert "(val_accuracy, max)" in (project_dir / "trials.md").read_text()
    return rows


# A 4-trial Bayesian search with --export-best, through the command line (~1 min on 2 cores).
@pytest.mark.slow
def test_bayesian_search_exports_the_best_config_as_a_servable_version(synth_manifest, tmp_path, capsys):
    # One hyperparameter: the first 3 trials are random, the 4th comes from the Gaussian process.
    space = {"learning_rate": SPACE["learning_rate"]}
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        "model.modalities=[image]",
        "name=bayes",
        f"export.base_path={tmp_path / 'models'}",
    )
    config_lib.save(dataclasses.replace(config, search_space=space), tmp_path / "tune.yaml")
    command = ["tune", "--config", str(tmp_path / "tune.yaml"), "--tuner", "bayesian", "--max-trials", "4"]
    assert cli.main([*command, "--directory", str(tmp_path / "results"), "--export-best"]) == 0
    project = tmp_path / "results" / "bayes"
    rows = assert_search_recorded(project, 4)
    oracle = json.loads((project / "oracle.json").read_text())
    assert {"alpha", "beta"} <= set(oracle)  # the Gaussian-process oracle's state, not random search's
    best = config_lib.load([project / "best_config.yaml"])
    assert best.train.learning_rate == pytest.approx(float(rows[0]["learning_rate"]))
    assert (project / "best_run" / "metrics.json").exists()
    version = tmp_path / "models" / "mmtf" / "1"
    assert f"exported {version}" in capsys.readouterr().out
    outputs = LocalModel(version).predict(images=[synth_manifest.parent / "images" / "synth_00000.png"])
    assert outputs["probabilities"].shape == (1, 8)
    np.testing.assert_allclose(outputs["probabilities"].sum(), 1.0, rtol=1e-5)


# Hyperband over 3 epochs: 6 trials, some resumed from a parent (~1 min on 2 cores).
@pytest.mark.slow
def test_hyperband_search_and_mmtf_train_of_its_best_config(synth_manifest, tmp_path):
    config = search_config(
        synth_manifest, "name=hyperband", "train.epochs=3", "train.early_stopping_patience=0"
    )
    config = dataclasses.replace(config, search_space={"learning_rate": SPACE["learning_rate"]})
    result = tuning.tune(config, "hyperband", directory=tmp_path, progress=False)
    rows = assert_search_recorded(result.project_dir, result.num_trials)
    assert result.num_trials >= 3
    epochs = [int(r["epochs"]) for r in rows]
    assert result.epochs_trained == sum(epochs) and max(epochs) > min(epochs), epochs  # brackets differ
    assert result.best_score == pytest.approx(float(rows[0]["score"]))
    assert cli.main(["train", "--config", str(result.best_config), "--set", "train.epochs=1"]) == 0
    best = config_lib.load([result.best_config])
    metrics = json.loads((Path(best.train.output_dir) / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
