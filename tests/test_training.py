"""mmtf train / evaluate on real files, tiny configs."""

import json

import numpy as np
import pytest

from multimodal_tf import cli
from multimodal_tf.callbacks import SwapEMAWeights
from multimodal_tf.compat import keras
from multimodal_tf.evaluation import classification_metrics, predict_split
from multimodal_tf.recipe import make_optimizer
from multimodal_tf.run_dir import load_trained_model
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


# Two full trainings (over a minute): with the slow tests, which CI runs too.
@pytest.mark.slow
def test_same_seed_gives_the_same_metrics(synth_manifest, tmp_path):
    histories = []
    for name in ("a", "b"):
        config = tiny_config(
            f"data.manifest={synth_manifest}", f"train.output_dir={tmp_path / name}", "train.epochs=2"
        )
        histories.append(json.loads((train(config, progress=False) / "history.json").read_text()))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(histories[0][key], histories[1][key], rtol=1e-6, err_msg=key)


# Two minutes on 2 cores; test_distribute checks MirroredStrategy's step in the default run.
@pytest.mark.slow
def test_mirrored_strategy_over_two_logical_cpus_trains_an_ensemble(synth_manifest, tmp_path):
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={tmp_path}",
        "train.strategy=mirrored",
        "train.ema_momentum=0.9",  # swapping averaged weights in and out of mirrored variables
        "model.ensemble_size=2",  # EnsembleModel's own train_step inside the replica context
    )
    run = train(config, progress=False)
    assert np.isfinite(json.loads((run / "history.json").read_text())["loss"]).all()
    run_config, metadata, model = load_trained_model(run)
    assert len(model.members) == 2
    assert cli.main(["evaluate", str(run), "--no-ablation"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert [r["member"] for r in report["members"]] == ["member_0", "member_1"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["log_loss"]) for r in report["members"])
    # The one-pass table equals each member predicting the split on its own.
    for row, member in zip(report["members"], model.members, strict=True):
        alone = classification_metrics(
            *predict_split(member, run_config, metadata, "test")[:2], metadata.label_names
        )
        assert row["accuracy"] == pytest.approx(alone["accuracy"])
        assert row["log_loss"] == pytest.approx(alone["log_loss"], rel=1e-5)
    assert "## Ensemble members alone" in (run / "report.md").read_text()


# slow: two more trainings (~22 s); keeps the default run under 15 min
@pytest.mark.slow
def test_unimodal_run_and_comparison_table(synth_manifest, trained_run, tmp_path):
    config = tiny_config(
        f"data.manifest={synth_manifest}", f"train.output_dir={tmp_path}", "model.modalities=[image]"
    )
    single = train(config, progress=False)
    assert cli.main(["evaluate", str(trained_run), "--compare", str(single), "--no-ablation"]) == 0
    report = json.loads((trained_run / "report.json").read_text())
    assert [r["modalities"] for r in report["comparison"]] == [["image", "text", "audio"], ["image"]]


# A real-data training (~50 s): with the slow tests, which CI runs too.
@pytest.mark.slow
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


def _fit_with_ema(swap: bool):
    """Tiny dense model, 3 epochs with the optimizer's weight averaging."""
    keras.utils.set_random_seed(0)
    x = np.random.RandomState(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    config = tiny_config("train.ema_momentum=0.9", "train.lr_schedule=constant", "train.learning_rate=0.05")
    model.compile(make_optimizer(config, steps_per_epoch=4), "binary_crossentropy")
    at_epoch_end = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            optimizer = self.model.optimizer
            at_epoch_end.append(
                [
                    (
                        v.numpy(),
                        optimizer._model_variables_moving_average[
                            optimizer._index_dict[optimizer._var_key(v)]
                        ].numpy(),
                    )
                    for v in self.model.trainable_variables
                ]
            )

    history = model.fit(
        x,
        y,
        validation_data=(x, y),
        epochs=3,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=([SwapEMAWeights()] if swap else []) + [Probe()],
    )
    return model, history.history, at_epoch_end, model.evaluate(x, y, verbose=0)


def test_ema_weights_are_validated_and_checkpointed_while_training_continues_from_raw_weights():
    swapped, history, at_epoch_end, final_loss = _fit_with_ema(swap=True)
    plain, plain_history, plain_epoch_end, plain_final_loss = _fit_with_ema(swap=False)
    for epoch in at_epoch_end:  # what checkpoints and early stopping see is the average
        for value, average in epoch:
            np.testing.assert_allclose(value, average, rtol=1e-6)
    assert any(not np.allclose(v, a) for epoch in plain_epoch_end for v, a in epoch)
    # The raw weights went back before each epoch trained: the same trajectory,
    # so both runs end on the same average (fit copies it in at the end).
    for a, b in zip(swapped.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history["loss"], plain_history["loss"], rtol=1e-5)
    # Validation judged the averaged weights, the very ones the model ends with.
    assert history["val_loss"][-1] == pytest.approx(final_loss, rel=1e-5)
    assert plain_history["val_loss"][-1] != pytest.approx(plain_final_loss, rel=1e-3)


def test_ema_momentum_out_of_range_is_a_config_error():
    with pytest.raises(ValueError, match="ema_momentum"):
        make_optimizer(tiny_config("train.ema_momentum=1.0"), steps_per_epoch=1)
