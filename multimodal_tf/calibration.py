"""Calibration: expected calibration error, reliability diagrams and temperature scaling.

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural
Networks") divides the logits by one scalar T fitted on the validation split
by minimising the negative log likelihood; it changes no prediction, only
how confident they are. With ``train.calibration: temperature`` the model
ends in a :class:`TemperatureScaling` layer whose ``temperature`` weight
:func:`calibrate_model` sets after training, so evaluation, the saved
weights and every exported SavedModel return calibrated probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from multimodal_tf.compat import keras, tf

NUM_BINS = 15  # Guo et al.'s ECE bins
CALIBRATIONS = ("none", "temperature")
# T is searched in [1 / MAX_TEMPERATURE, MAX_TEMPERATURE].
MAX_TEMPERATURE = 100.0
_TINY = 1e-30  # log of a probability that underflowed to 0


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS
) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |B|/N |accuracy(B) - confidence(B)|.

    Args:
        probabilities: [N, K] class probabilities (a binary head's as [P(0), P(1)]).
        labels: [N] integer class labels.
        num_bins: bins (0, 1/M], (1/M, 2/M], ... (1 - 1/M, 1].
    """
    confidence, correct = _top_label(probabilities, labels)
    if not len(confidence):
        return 0.0
    bins = _bin_index(confidence, num_bins)
    total = 0.0
    for b in range(num_bins):
        inside = bins == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> list[dict]:
    """Per non-empty bin: its range, example count, mean confidence and accuracy."""
    confidence, correct = _top_label(probabilities, labels)
    bins = _bin_index(confidence, num_bins)
    rows = []
    for b in range(num_bins):
        inside = bins == b
        if inside.any():
            rows.append(
                {
                    "low": b / num_bins,
                    "high": (b + 1) / num_bins,
                    "count": int(inside.sum()),
                    "confidence": float(confidence[inside].mean()),
                    "accuracy": float(correct[inside].mean()),
                }
            )
    return rows


def _top_label(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, np.float64)
    return probabilities.max(-1), (probabilities.argmax(-1) == np.asarray(labels)).astype(np.float64)


def _bin_index(confidence: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin b holds (b/M, (b+1)/M]; a confidence of exactly 0 joins bin 0."""
    return np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)


def plot_reliability_diagram(probabilities: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Accuracy vs confidence per bin (bars) against the diagonal, with the ECE in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = reliability_bins(probabilities, labels)
    fig, axis = plt.subplots(figsize=(4.5, 4.5))
    width = 1.0 / NUM_BINS
    axis.bar([r["low"] for r in rows], [r["accuracy"] for r in rows], width, align="edge", label="accuracy")
    axis.bar(
        [r["low"] for r in rows],
        [r["confidence"] - r["accuracy"] for r in rows],
        width,
        bottom=[r["accuracy"] for r in rows],
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    axis.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top label)", ylabel="accuracy")
    axis.set_title(f"Reliability diagram (ECE {expected_calibration_error(probabilities, labels):.4f})")
    axis.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def negative_log_likelihood(
    logits: np.ndarray, targets: np.ndarray, temperature: float, activation: str
) -> float:
    """Mean NLL of ``activation(logits / temperature)``.

    softmax: ``targets`` are [N] class ids; sigmoid: [N, K] 0/1 targets (the
    mean is over every entry).
    """
    z = np.asarray(logits, np.float64) / temperature
    if activation == "softmax":
        shift = z.max(-1, keepdims=True)
        log_norm = np.log(np.exp(z - shift).sum(-1)) + shift[:, 0]
        return float(np.mean(log_norm - z[np.arange(len(z)), np.asarray(targets)]))
    return float(np.mean(np.logaddexp(0.0, z) - np.asarray(targets, np.float64) * z))


def fit_temperature(logits: np.ndarray, targets: np.ndarray, activation: str) -> float:
    """The T in [1/100, 100] minimising :func:`negative_log_likelihood`.

    The NLL is convex in ``1 / T`` (a log-sum-exp, or softplus, of linear
    functions of it), so the sign of its derivative brackets the minimum:
    bisection on ``log(1/T)`` finds it to float precision, with no optimiser
    to tune.
    """
    z = np.asarray(logits, np.float64)
    if activation == "softmax":
        targets = np.asarray(targets)

        def slope(beta: float) -> float:  # d NLL / d beta
            scaled = beta * z
            p = np.exp(scaled - scaled.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            return float(np.mean((p * z).sum(-1) - z[np.arange(len(z)), targets]))
    elif activation == "sigmoid":
        y = np.asarray(targets, np.float64)

        def slope(beta: float) -> float:
            return float(np.mean((0.5 * (1.0 + np.tanh(0.5 * beta * z)) - y) * z))
    else:
        raise ValueError(f"fit_temperature: activation must be softmax or sigmoid, got {activation!r}")
    low, high = -np.log(MAX_TEMPERATURE), np.log(MAX_TEMPERATURE)  # log beta
    if slope(np.exp(low)) >= 0:
        return MAX_TEMPERATURE
    if slope(np.exp(high)) <= 0:
        return 1.0 / MAX_TEMPERATURE
    for _ in range(100):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if slope(np.exp(middle)) < 0 else (low, middle)
    return float(np.exp(-0.5 * (low + high)))


def logits_of(scores: np.ndarray, from_logits: bool, activation: str) -> np.ndarray:
    """What :class:`TemperatureScaling` divides by T, from its input (NumPy, float64)."""
    scores = np.asarray(scores, np.float64)
    if from_logits:
        return scores
    p = np.maximum(scores, _TINY)
    if activation == "softmax":
        return np.log(p)
    return np.log(p) - np.log(np.maximum(1.0 - scores, _TINY))


@keras.utils.register_keras_serializable(package="multimodal_tf")
class TemperatureScaling(keras.layers.Layer):
    """``activation(logits / T)`` with T a non-trainable weight (1 until calibrated).

    Call arguments:
        scores: float [B, K] logits, or probabilities with ``from_logits=False``
            (then the logits are ``log p``, or ``log p - log(1 - p)`` for
            sigmoid; softmax is unchanged by the shift ``log p`` differs by).

    Returns:
        float32 [B, K] probabilities.

    Args:
        activation: ``softmax`` or ``sigmoid`` (the head's).
        from_logits: whether ``scores`` are logits.
        **kwargs: standard layer arguments.
    """

    def __init__(self, activation: str = "softmax", from_logits: bool = True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"{self.name}: activation must be softmax or sigmoid, got {activation!r}")
        self.activation = activation
        self.from_logits = from_logits

    def build(self, input_shape) -> None:
        self.temperature = self.add_weight("temperature", [], "float32", "ones", trainable=False)
        super().build(input_shape)

    def call(self, scores: tf.Tensor) -> tf.Tensor:
        scores = tf.cast(scores, tf.float32)
        if self.from_logits:
            logits = scores
        elif self.activation == "softmax":
            logits = tf.math.log(tf.maximum(scores, _TINY))
        else:
            logits = tf.math.log(tf.maximum(scores, _TINY)) - tf.math.log(tf.maximum(1.0 - scores, _TINY))
        logits = logits / self.temperature
        return tf.nn.softmax(logits) if self.activation == "softmax" else tf.sigmoid(logits)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"activation": self.activation, "from_logits": self.from_logits})
        return config


def head_targets(labels: np.ndarray, head_type: str, num_outputs: int) -> np.ndarray:
    """Integer labels [N] -> what :func:`negative_log_likelihood` takes for the head."""
    labels = np.asarray(labels)
    if head_type == "multiclass" or labels.ndim == 2:
        return labels
    if head_type == "binary":
        return labels.reshape(-1, 1).astype(np.float64)
    return np.eye(num_outputs)[labels]


def calibrate_model(model, config, metadata, split: str = "val") -> dict:
    """Fits the temperature of ``model``'s TemperatureScaling output on ``split`` and sets it.

    Returns:
        ``temperature`` and the split's NLL and ECE before and after.
    """
    from multimodal_tf.data.pipeline import make_dataset  # noqa: PLC0415  (pipeline is heavy)

    if config.data.targets:
        return _calibrate_targets(model, config, metadata, split)
    layer = model.get_layer("probabilities")
    if not isinstance(layer, TemperatureScaling):
        raise ValueError("calibrate_model: the model has no TemperatureScaling output (train.calibration)")
    scores_model = keras.Model(model.inputs, layer.input)
    scores, labels = [], []
    for x, y in make_dataset(config, split, training=False, metadata=metadata):
        scores.append(scores_model(x, training=False).numpy())
        labels.append(y.numpy())
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    logits = logits_of(scores, layer.from_logits, layer.activation)
    targets = head_targets(labels, config.model.head.type, logits.shape[-1])
    temperature = fit_temperature(logits, targets, layer.activation)
    layer.temperature.assign(temperature)
    result = {"temperature": temperature, "split": split}
    for key, t in (("before", 1.0), ("after", temperature)):
        probabilities = _report_probabilities(logits / t, layer.activation)
        result[key] = {
            "nll": negative_log_likelihood(logits, targets, t, layer.activation),
            "ece": expected_calibration_error(probabilities, labels),
        }
    return result


def _calibrate_targets(model, config, metadata, split: str) -> dict:
    """:func:`calibrate_model` with ``data.targets``: one temperature per calibrated target.

    The primary (multiclass) target's temperature is fitted as a one-output
    model's; each multilabel target gets one temperature for all its labels
    (sigmoid NLL over every label), fitted on the examples whose label is
    present only; regression targets are not calibrated. Returns the
    primary's result (as :func:`calibrate_model`) plus ``targets``: per
    calibrated target its temperature, examples and NLL before and after.
    """
    from multimodal_tf import targets as targets_lib  # noqa: PLC0415  (targets imports this module)
    from multimodal_tf.data.pipeline import make_dataset  # noqa: PLC0415

    layers = {t.name: model.get_layer(t.name) for t in config.data.targets if targets_lib.calibrated(t)}
    scores_model = keras.Model(model.inputs, {name: layer.input for name, layer in layers.items()})
    scores, labels = {name: [] for name in layers}, {name: [] for name in layers}
    dataset = make_dataset(config, split, training=False, metadata=metadata, with_targets=True)
    for x, y in dataset:
        out = scores_model(x, training=False)
        for name in layers:
            scores[name].append(out[name].numpy())
            labels[name].append(y[name].numpy())
    result = {}
    for name, layer in layers.items():
        logits = logits_of(np.concatenate(scores[name]), layer.from_logits, layer.activation)
        targets = np.concatenate(labels[name])
        if layer.activation == "sigmoid":  # packed [values..., present]: present rows only
            present = targets[:, -1] > 0
            logits, targets = logits[present], targets[present, :-1]
        temperature = fit_temperature(logits, targets, layer.activation) if len(logits) else 1.0
        layer.temperature.assign(temperature)
        result[name] = {"temperature": temperature, "examples": len(logits)}
        for key, t in (("before", 1.0), ("after", temperature)):
            nll = negative_log_likelihood(logits, targets, t, layer.activation) if len(logits) else 0.0
            result[name][key] = {"nll": nll}
            if layer.activation == "softmax":
                probabilities = _report_probabilities(logits / t, layer.activation)
                result[name][key]["ece"] = expected_calibration_error(probabilities, targets)
    primary = targets_lib.primary(config.data).name
    return {**result[primary], "split": split, "targets": result}


def _report_probabilities(logits: np.ndarray, activation: str) -> np.ndarray:
    """Scaled logits -> the [N, K] probabilities reports use (binary: [P(0), P(1)])."""
    if activation == "softmax":
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)
    p = 1.0 / (1.0 + np.exp(-logits))
    return np.concatenate([1.0 - p, p], -1) if p.shape[-1] == 1 else p
