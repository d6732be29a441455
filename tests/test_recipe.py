"""The training recipe: a Keras Tuner trial trains and scores exactly like ``mmtf train``."""

import json

import pytest

from multimodal_tf import recipe, tuning
from multimodal_tf.data.cache import prepare_data
from multimodal_tf.testing import tiny_config
from multimodal_tf.training import train

# One value per hyperparameter: the single trial's config is the base config.
ONE_POINT_SPACE = {"fusion": {"type": "choice", "values": ["concat"], "key": "model.fusion.name"}}


def recipe_config(manifest, tmp_path):
    """Image-only, three epochs, with every recipe callback switched on."""
    return tiny_config(
        f"data.manifest={manifest}",
        f"train.output_dir={tmp_path / 'run'}",
        "model.modalities=[image]",
        "train.epochs=3",
        "train.ema_momentum=0.9",  # the weight-average swap changes val metrics
        "train.lr_schedule=plateau",
        "train.early_stopping_patience=2",
        "train.learning_rate=0.01",
    )


def test_callbacks_for_puts_the_average_swap_first_and_restores_the_best_weights():
    config = tiny_config(
        "train.ema_momentum=0.9", "train.lr_schedule=plateau", "train.early_stopping_patience=3"
    )
    marker = object()
    callbacks = recipe.callbacks_for(config, between=[marker])
    names = [type(c).__name__ for c in callbacks]
    assert names == ["SwapEMAWeights", "object", "EarlyStopping", "ReduceLROnPlateau"]
    assert callbacks[2].restore_best_weights and callbacks[2].patience == 3
    plain = recipe.callbacks_for(tiny_config("train.lr_schedule=constant", "train.early_stopping_patience=0"))
    assert plain == []


def test_a_one_trial_search_scores_the_config_as_mmtf_train_does(synth_manifest, tmp_path):
    config = recipe_config(synth_manifest, tmp_path)
    history = json.loads((train(config, progress=False) / "history.json").read_text())

    metadata = prepare_data(config.data, progress=False)
    hypermodel = tuning.MultimodalHyperModel(config, metadata, ONE_POINT_SPACE)
    tuner = tuning.make_tuner("random", hypermodel, tmp_path / "tune", max_trials=1)
    tuner.search(verbose=0)
    (trial,) = tuner.oracle.trials.values()
    # Keras Tuner keeps the best epoch's metrics: each equals train's value at that epoch.
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        (observation,) = trial.metrics.get_history(metric)
        assert observation.value[0] == pytest.approx(history[metric][observation.step], abs=1e-6), metric
    assert trial.score == pytest.approx(max(history["val_accuracy"]))
    assert tuning.reports.trial_epochs(tuner, trial.trial_id) == len(history["loss"])
