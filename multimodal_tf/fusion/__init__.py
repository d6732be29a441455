"""Fusion layers, registered in ``registry.FUSIONS`` by family name.

Importing this package registers every family: ``concat``, ``weighted_sum``,
``gated``, ``attention``, ``cross_attention``, ``late`` and ``tensor``, each with its config class
(``ConcatFusionConfig``, ...: the layer's constructor arguments, which are the
only fields ``model.fusion`` accepts for that family).
"""

from __future__ import annotations

from collections.abc import Sequence

from multimodal_tf.config import FusionConfig
from multimodal_tf.fusion.attention import AttentionFusion, AttentionFusionConfig
from multimodal_tf.fusion.base import FusionLayer, masked_softmax, zero_absent
from multimodal_tf.fusion.concat import ConcatFusion, ConcatFusionConfig
from multimodal_tf.fusion.cross_attention import CrossAttentionFusion, CrossAttentionFusionConfig
from multimodal_tf.fusion.gated import GatedFusion, GatedFusionConfig
from multimodal_tf.fusion.late import LateFusion, LateFusionConfig
from multimodal_tf.fusion.tensor import TensorFusion, TensorFusionConfig
from multimodal_tf.fusion.weighted_sum import WeightedSumFusion, WeightedSumFusionConfig
from multimodal_tf.registry import FUSIONS

__all__ = [
    "AttentionFusion",
    "AttentionFusionConfig",
    "ConcatFusion",
    "ConcatFusionConfig",
    "CrossAttentionFusion",
    "CrossAttentionFusionConfig",
    "FusionLayer",
    "GatedFusion",
    "GatedFusionConfig",
    "LateFusion",
    "LateFusionConfig",
    "TensorFusion",
    "TensorFusionConfig",
    "WeightedSumFusion",
    "WeightedSumFusionConfig",
    "build_fusion",
    "masked_softmax",
    "zero_absent",
]


def build_fusion(
    config: FusionConfig,
    modalities: Sequence[str],
    *,
    num_outputs: int | None = None,
    output_activation: str | None = None,
    **kwargs,
) -> FusionLayer:
    """The fusion layer of ``config``'s family, with the family's fields as arguments.

    Args:
        config: the family's config (e.g. :class:`LateFusionConfig`).
        modalities: modality names, in the order the model uses them.
        num_outputs: classifier output units; passed only to decision-level
            fusion (``produces_probabilities``), which needs it.
        output_activation: ``"softmax"`` or ``"sigmoid"`` (same).
        **kwargs: layer arguments such as ``name``.

    Raises:
        KeyError: ``config.name`` is not a registered fusion.
        TypeError: ``config`` is not the config class of its family.
        ValueError: decision-level fusion without ``num_outputs``.
    """
    fusion_class = FUSIONS.get(config.name)
    config_class = FUSIONS.config(config.name)
    if type(config) is not config_class:
        raise TypeError(
            f"fusion {config.name!r} takes a {config_class.__name__}, got {type(config).__name__}"
        )
    if fusion_class.produces_probabilities:
        if num_outputs is None or output_activation is None:
            raise ValueError(
                f"{config.name} fusion needs num_outputs and output_activation (it outputs probabilities)"
            )
        kwargs.update(num_outputs=num_outputs, output_activation=output_activation)
    return fusion_class(modalities, **config.layer_arguments(), **kwargs)
