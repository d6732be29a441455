"""Quantization-aware training with tfmot, on the layers tfmot supports; the rest stays float in training.

tfmot's ``quantize_model`` refuses a model with any layer its 8-bit registry
does not know, and every model here starts with custom encoders. So only
the top-level layers the registry supports (Dense, Conv, ... : in practice
the classification head of ``concat``/``gated``/``attention`` fusions) are
annotated with ``quantize_annotate_layer``; ``quantize_apply`` then inserts
fake-quant ops around them and leaves the custom layers (encoders, fusion,
modality dropout) as they are, float, trained as usual. tfmot cannot reach
the Dense/Conv layers *inside* a custom layer: it wraps top-level layers
only. The fine-tune is the recipe's (train split, the run's loss and
optimizer at a constant rate), then the QAT model goes through the same
int8 conversion as post-training int8 (``quantization.convert_int8``): the
annotated layers keep the ranges QAT learned, the custom layers are
calibrated on the train split.
"""

from __future__ import annotations

import dataclasses

from multimodal_tf import recipe
from multimodal_tf.compat import keras


@dataclasses.dataclass(frozen=True)
class QATResult:
    """A quantization-aware fine-tuned model and what was annotated.

    Attributes:
        model: the QAT Keras model (fake-quant wrappers on ``annotated``).
        annotated: top-level layers trained with fake quantization.
        float_layers: top-level layers with weights left unannotated
            (custom layers tfmot does not support).
        history: the fine-tune's Keras history.
    """

    model: object
    annotated: tuple[str, ...]
    float_layers: tuple[str, ...]
    history: dict


def supported(layer) -> bool:
    """Whether tfmot's default 8-bit registry knows ``layer`` (Dense, Conv2D, ...)."""
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: PLC0415
        default_8bit_quantize_registry,  # the registry quantize_model itself consults
    )

    return default_8bit_quantize_registry.Default8BitQuantizeRegistry().supports(layer)


def quantize_aware_model(model):
    """``model`` with its tfmot-supported top-level layers annotated and ``quantize_apply``-ed.

    Returns:
        ``(qat_model, annotated layer names, unannotated layer names with weights)``.
    """
    import tensorflow_model_optimization as tfmot  # noqa: PLC0415

    annotated, float_layers = [], []

    def annotate(layer):
        clone = layer.__class__.from_config(layer.get_config())
        if layer.weights and supported(layer):
            annotated.append(layer.name)
            return tfmot.quantization.keras.quantize_annotate_layer(clone)
        if layer.weights:
            float_layers.append(layer.name)
        return clone

    annotated_model = keras.models.clone_model(model, clone_function=annotate)
    annotated_model.set_weights(model.get_weights())  # clone_model builds fresh variables
    if not annotated:
        raise ValueError(
            "--qat: no top-level layer of this model is one tfmot can quantize (Dense, Conv, ...); "
            "a fusion that ends in its own classifier (late) has none: use post-training --quantize int8"
        )
    with tfmot.quantization.keras.quantize_scope(_custom_objects(model)):
        qat_model = tfmot.quantization.keras.quantize_apply(annotated_model)
    return qat_model, tuple(annotated), tuple(float_layers)


def _custom_objects(model) -> dict:
    """Our layer classes by name: quantize_apply rebuilds the model from its config."""
    return {type(layer).__name__: type(layer) for layer in model.layers}


def train_qat(model, config, metadata, epochs: int) -> QATResult:
    """Quantization-aware fine-tune of a trained ``model`` on the train split (``model`` is unchanged)."""
    if epochs < 1:
        raise ValueError(f"--qat must be a number of epochs >= 1, got {epochs}")
    qat_model, annotated, float_layers = quantize_aware_model(model)
    history = recipe.fine_tune(qat_model, config, metadata, epochs)
    return QATResult(qat_model, annotated, float_layers, history)
