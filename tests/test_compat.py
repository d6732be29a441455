"""The shims of compat.py, on whichever stack runs the tests (CI runs both locks)."""

from __future__ import annotations

import numpy as np

from multimodal_tf import compat
from multimodal_tf.compat import keras, tf


def test_keras_tuner_searches_tf_keras_models(tmp_path):
    kt = compat.import_keras_tuner()
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)

    def build(hp):
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(hp.Choice("units", [2, 4]), activation="relu"),
                keras.layers.Dense(2),
            ]
        )
        model.compile(
            "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
        )
        assert isinstance(model, keras.Model)
        return model

    tuner = kt.RandomSearch(
        build, objective="val_accuracy", max_trials=2, directory=str(tmp_path), project_name="p", seed=0
    )
    tuner.search(x, y, validation_data=(x, y), epochs=1, verbose=0)
    trials = tuner.oracle.get_best_trials(2)
    assert len(trials) == 2 and all(t.status == "COMPLETED" for t in trials)
    assert all(t.metrics.get_best_value("val_accuracy") is not None for t in trials)
    assert isinstance(tuner.get_best_models(1)[0], keras.Model)


def test_message_to_dict_prints_default_valued_fields():
    from tensorflow.core.framework import tensor_shape_pb2

    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=0, name="")])
    out = compat.message_to_dict(shape)
    # TF Serving's REST metadata prints a 0 dim and an empty name.
    assert out == {"dim": [{"size": "0", "name": ""}], "unknown_rank": False}


def test_tf_keras_is_the_keras_of_tf():
    assert tf.keras.layers.Dense is keras.layers.Dense
