"""Magnitude pruning with tensorflow-model-optimization, fine-tuned through the training recipe.

The model from ``build_model`` nests its kernels inside custom layers (the
encoders, some fusions), which tfmot's PruneRegistry does not know. tfmot
accepts any layer that has a ``get_prunable_weights`` method (the same thing
``PruneRegistry.make_prunable`` does for built-in layers), so each top-level
layer with kernels gets one listing its own kernels: every trainable weight
of rank >= 2 (Dense/Conv kernels, LSTM kernels and recurrent kernels,
embeddings, attention projections), never biases or normalization scales.

The wrappers wrap the *original* layer objects, so once pruning ends the
model that was loaded holds the sparse weights and is exported as usual.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from multimodal_tf import recipe
from multimodal_tf.compat import keras, tf


@dataclasses.dataclass(frozen=True)
class PruningResult:
    """What pruning reached.

    Attributes:
        target_sparsity: the requested fraction of zeros in prunable weights.
        sparsity: the fraction of zeros actually in them after pruning.
        pruned_weights: number of prunable weight values.
        layers: names of the top-level layers that were pruned.
        fine_tune_steps: training steps of the pruning fine-tune.
        history: the fine-tune's Keras history.
    """

    target_sparsity: float
    sparsity: float
    pruned_weights: int
    layers: tuple[str, ...]
    fine_tune_steps: int
    history: dict


def prunable_weights(layer) -> list:
    """The weights of ``layer`` that pruning zeroes: trainable, rank >= 2."""
    return [w for w in layer.trainable_weights if len(w.shape) >= 2]


def sparsity_of(weights) -> float:
    """Fraction of exact zeros over all values of ``weights`` (NumPy, independent of tfmot)."""
    values = [np.asarray(w) for w in weights]
    total = sum(v.size for v in values)
    if total == 0:
        raise ValueError("no prunable weights to measure")
    return float(sum(int((v == 0).sum()) for v in values) / total)


def model_prunable_weights(model) -> list:
    """Every prunable weight of ``model``'s top-level layers."""
    return [w for layer in model.layers for w in prunable_weights(layer)]


def pruning_schedule(target_sparsity: float, total_steps: int):
    """PolynomialDecay from 0 to ``target_sparsity``, reached by ~80% of the fine-tune.

    The mask is updated every ``frequency`` steps and only on steps
    ``begin + k * frequency``, so ``end_step`` is a multiple of it: tfmot
    then prunes exactly at ``end_step`` and the target is reached, and the
    steps after it fine-tune the surviving weights with the mask fixed.
    """
    if not 0.0 < target_sparsity < 1.0:
        raise ValueError(f"--prune must be a sparsity in (0, 1), e.g. 0.8; got {target_sparsity}")
    if total_steps < 2:
        raise ValueError(f"pruning needs at least 2 fine-tune steps, got {total_steps}")
    frequency = max(1, total_steps // 10)
    end_step = max(frequency, frequency * math.floor(0.8 * total_steps / frequency))
    import tensorflow_model_optimization as tfmot  # noqa: PLC0415  (heavy; only here)

    return tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=target_sparsity,
        begin_step=0,
        end_step=end_step,
        frequency=frequency,
    )


def wrap_for_pruning(model, schedule):
    """A clone of ``model`` whose layers with kernels are tfmot PruneLowMagnitude wrappers.

    Returns:
        ``(pruning_model, names of the wrapped layers)``.
    """
    import tensorflow_model_optimization as tfmot  # noqa: PLC0415

    wrapped = []

    def wrap(layer):
        weights = prunable_weights(layer)
        if not weights:
            return layer
        if not hasattr(layer, "get_prunable_weights"):
            # tfmot's contract for custom layers (what make_prunable does for built-ins).
            layer.get_prunable_weights = lambda weights=weights: weights
        wrapped.append(layer.name)
        return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)

    # The original layer objects are reused (clone_function returns them or a
    # wrapper around them), so their variables are shared with ``model``.
    pruning_model = keras.models.clone_model(model, clone_function=wrap)
    return pruning_model, tuple(wrapped)


def apply_masks(pruning_model) -> None:
    """weights *= mask in every wrapper: the last gradient step ran after the last mask op."""
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (  # noqa: PLC0415
        PruneLowMagnitude,  # not exported by tfmot's public API
    )

    for layer in pruning_model.layers:
        if isinstance(layer, PruneLowMagnitude):
            for weight, mask, _ in layer.pruning_vars:
                weight.assign(weight * tf.cast(mask, weight.dtype))


def prune_model(model, config, metadata, target_sparsity: float, epochs: int = 2) -> PruningResult:
    """Prunes ``model`` in place to ``target_sparsity``, fine-tuning on the training split.

    The fine-tune uses the recipe's datasets (the train split through the
    real pipeline, head targets, class weights) and optimizer settings
    (no schedule: a constant rate at the run's learning rate).

    Args:
        model: a trained model from ``build_model`` (its weights change).
        config: the run's config.
        metadata: the run's dataset metadata.
        target_sparsity: fraction of prunable weights to zero, in (0, 1).
        epochs: fine-tune epochs over the train split.
    """
    import tensorflow_model_optimization as tfmot  # noqa: PLC0415

    if epochs < 1:
        raise ValueError(f"--prune-epochs must be >= 1, got {epochs}")
    total_steps = epochs * recipe.steps_per_epoch(config, metadata)
    schedule = pruning_schedule(target_sparsity, total_steps)
    pruning_model, layers = wrap_for_pruning(model, schedule)
    if not layers:
        raise ValueError("the model has no layer with kernels to prune")
    history = recipe.fine_tune(
        pruning_model, config, metadata, epochs, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()]
    )
    apply_masks(pruning_model)
    tfmot.sparsity.keras.strip_pruning(pruning_model)  # the wrappers go; ``model`` keeps the weights
    weights = model_prunable_weights(model)
    return PruningResult(
        target_sparsity=target_sparsity,
        sparsity=sparsity_of(weights),
        pruned_weights=int(sum(np.prod(w.shape) for w in weights)),
        layers=layers,
        fine_tune_steps=total_steps,
        history=history,
    )
