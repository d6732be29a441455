"""FLOP counts against independent analytic counts, and the matmul peak."""

from __future__ import annotations

import pytest

from multimodal_tf import profiling
from multimodal_tf.compat import keras, tf
from multimodal_tf.data import features
from multimodal_tf.models import build_model
from multimodal_tf.testing import tiny_config


def test_dense_and_conv_flops_equal_the_analytic_count():
    inputs = keras.Input((9, 7, 3), name="x")
    h = keras.layers.Conv2D(4, (3, 2), padding="valid", name="conv")(inputs)  # 7x6x4 out
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(5, use_bias=False, name="dense")(h)
    model = keras.Model(inputs, outputs)
    conv = 2 * (7 * 6 * 4) * (3 * 2 * 3) + 7 * 6 * 4  # multiply-adds + bias per output
    dense = 2 * (7 * 6 * 4) * 5  # 2·k·n per example, no bias
    count = profiling.forward_flops(model, tf.TensorSpec([None, 9, 7, 3], tf.float32), batch_size=3)
    assert count.profiler == conv + dense
    assert count.recurrent == 0 and count.uncounted_ops == 0
    assert count.train == 3 * count.forward


def test_lstm_flops_are_added_analytically():
    inputs = keras.Input((10,), dtype="int64", name="tokens")
    h = keras.layers.Embedding(50, 6)(inputs)
    h = keras.layers.Bidirectional(keras.layers.LSTM(4))(h)
    model = keras.Model(inputs, keras.layers.Dense(3, use_bias=False)(h))
    count = profiling.forward_flops(model, {"tokens": tf.TensorSpec([None, 10], tf.int64)}, batch_size=2)
    # Per direction and step: x·W (6x16) and h·U (4x16), 2 FLOPs per multiply-add.
    assert count.recurrent == 2 * 10 * 2 * (6 * 16 + 4 * 16)
    assert count.uncounted_ops > 0  # the loop bodies the profiler could not see
    assert count.profiler >= 2 * 8 * 3  # the Dense head is still counted


def test_tiny_multimodal_model_has_a_count():
    config = tiny_config()
    model = build_model(config, num_classes=3, vocab_size=50)
    count = profiling.forward_flops(model, features.model_feature_specs(config.data, config.model))
    assert count.profiler > 0 and count.recurrent > 0  # CNNs counted, text/lstm added


def test_matmul_peak_is_a_plausible_rate():
    rate = profiling.matmul_peak(size=256, chain=2, repeats=2)
    assert 1e8 < rate < 1e15


def test_unknown_sequence_length_is_an_error():
    inputs = keras.Input((None, 3), name="seq")
    model = keras.Model(inputs, keras.layers.GRU(2, name="gru")(inputs))
    with pytest.raises(ValueError, match="gru"):
        profiling.recurrent_flops(model)
