"""Calibration: ECE against an independent computation, temperature fit against scipy, the layer."""

import numpy as np
import pytest
from scipy import optimize, special

from multimodal_tf import calibration
from multimodal_tf.compat import tf
from multimodal_tf.evaluation import classification_metrics


def reference_ece(probabilities, labels, num_bins=15):
    """Guo et al.'s ECE, written out: bins (lower, upper], |acc - conf| weighted by bin share."""
    confidences = probabilities.max(1)
    accuracies = probabilities.argmax(1) == labels
    edges = np.linspace(0, 1, num_bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidences > lower) & (confidences <= upper)
        if in_bin.mean() > 0:
            ece += abs(accuracies[in_bin].mean() - confidences[in_bin].mean()) * in_bin.mean()
    return ece


def test_ece_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right):
    # bin of 0.9: |0.5 - 0.9| * 2/4 = 0.2; bin of 0.6: |1 - 0.6| * 2/4 = 0.2.
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    assert calibration.expected_calibration_error(p, labels) == pytest.approx(0.4)
    # Perfect confidence and always right: 0.
    assert calibration.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_ece_equals_independent_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 5)) * 3
    p = special.softmax(logits, axis=1)
    labels = rng.integers(0, 5, 500)
    assert calibration.expected_calibration_error(p, labels) == pytest.approx(
        reference_ece(p, labels), abs=1e-12
    )
    metrics = classification_metrics(p, labels, [f"c{i}" for i in range(5)])
    assert metrics["ece"] == pytest.approx(reference_ece(p, labels), abs=1e-12)
    assert sum(r["count"] for r in metrics["reliability"]) == 500


def overconfident(num=2000, classes=4, seed=1):
    """Logits whose softmax is too sure: the labels follow softmax(true / 1), the model says true * 3."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(num, classes)) * 2
    labels = np.array([rng.choice(classes, p=row) for row in special.softmax(true, axis=1)])
    return true * 3, labels


def scipy_temperature(nll):
    result = optimize.minimize_scalar(
        lambda log_t: nll(np.exp(log_t)),
        bounds=(-np.log(100), np.log(100)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return float(np.exp(result.x))


def test_temperature_matches_scipy_and_lowers_ece_softmax():
    logits, labels = overconfident()

    def nll(t):  # written here, not the library's
        return -np.mean(special.log_softmax(logits / t, axis=1)[np.arange(len(labels)), labels])

    fitted = calibration.fit_temperature(logits, labels, "softmax")
    assert fitted == pytest.approx(scipy_temperature(nll), abs=1e-3)
    assert fitted > 2  # it undoes most of the 3x over-confidence
    before = calibration.expected_calibration_error(special.softmax(logits, axis=1), labels)
    after = calibration.expected_calibration_error(special.softmax(logits / fitted, axis=1), labels)
    assert after < before


def test_temperature_matches_scipy_sigmoid():
    rng = np.random.default_rng(2)
    true = rng.normal(size=(1000, 1)) * 2
    targets = (rng.random((1000, 1)) < special.expit(true)).astype(float)
    logits = true * 4

    def nll(t):
        z = logits / t
        return np.mean(np.logaddexp(0, z) - targets * z)

    fitted = calibration.fit_temperature(logits, targets, "sigmoid")
    assert fitted == pytest.approx(scipy_temperature(nll), abs=1e-3)


@pytest.mark.parametrize("from_logits", [True, False])
def test_temperature_layer_is_softmax_of_log_p_over_t(from_logits):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 4)).astype(np.float32) * 4
    p = special.softmax(logits.astype(np.float64), axis=1)
    layer = calibration.TemperatureScaling("softmax", from_logits=from_logits)
    inputs = logits if from_logits else p.astype(np.float32)
    np.testing.assert_allclose(layer(tf.constant(inputs)).numpy(), p, atol=1e-6)  # T = 1: unchanged
    layer.temperature.assign(2.5)
    np.testing.assert_allclose(
        layer(tf.constant(inputs)).numpy(), special.softmax(np.log(p) / 2.5, axis=1), atol=1e-5
    )


def test_temperature_layer_sigmoid_scales_the_logit():
    logits = np.array([[-3.0], [0.5], [6.0]], np.float32)
    layer = calibration.TemperatureScaling("sigmoid", from_logits=False)
    layer.build((None, 1))
    layer.temperature.assign(2.0)
    out = layer(tf.constant(special.expit(logits))).numpy()
    np.testing.assert_allclose(out, special.expit(logits / 2.0), atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.head.type=binary",),  # sigmoid: the logit is scaled
        ("model.ensemble_size=2",),  # one temperature on the average's log-probabilities
    ],
)
def test_calibrated_model_scales_its_uncalibrated_output(overrides):
    from multimodal_tf import models
    from multimodal_tf.testing import random_features, tiny_config

    config = tiny_config(
        "model.modalities=[text]",
        "model.text_encoder.name=text/bow",
        "train.calibration=temperature",
        *overrides,
    )
    num_classes = 2 if config.model.head.type == "binary" else 3
    model = models.build_model(config, num_classes, vocab_size=50)
    x = random_features(config, batch_size=5)
    layer = model.get_layer(models.OUTPUT_NAME)
    uncalibrated = model(x, training=False).numpy().astype(np.float64)  # T = 1
    layer.temperature.assign(3.0)
    calibrated = model(x, training=False).numpy()
    if config.model.head.type == "binary":
        expected = special.expit(special.logit(uncalibrated) / 3.0)
    else:
        expected = special.softmax(np.log(uncalibrated) / 3.0, axis=1)
    np.testing.assert_allclose(calibrated, expected, atol=1e-5)
