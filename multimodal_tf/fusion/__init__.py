"""Fusion layers, registered in ``registry.FUSIONS`` by family name.

Importing this package registers every family: ``concat``, ``weighted_sum``,
``gated``, ``attention``, ``late`` and ``tensor``.
"""

from __future__ import annotations

from collections.abc import Sequence

from multimodal_tf.config import FusionConfig
from multimodal_tf.fusion.attention import AttentionFusion
from multimodal_tf.fusion.base import FusionLayer, masked_softmax, zero_absent
from multimodal_tf.fusion.concat import ConcatFusion
from multimodal_tf.fusion.gated import GatedFusion
from multimodal_tf.fusion.late import LateFusion
from multimodal_tf.fusion.tensor import TensorFusion
from multimodal_tf.fusion.weighted_sum import WeightedSumFusion
from multimodal_tf.registry import FUSIONS

__all__ = [
    "AttentionFusion",
    "ConcatFusion",
    "FusionLayer",
    "GatedFusion",
    "LateFusion",
    "TensorFusion",
    "WeightedSumFusion",
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
    """The fusion layer named by ``config.name``.

    Args:
        config: fusion settings.
        modalities: modality names, in the order the model uses them.
        num_outputs: classifier output units (used by decision-level fusion).
        output_activation: ``"softmax"`` or ``"sigmoid"`` (same).
        **kwargs: layer arguments such as ``name``.
    """
    fusion_class = FUSIONS.get(config.name)
    return fusion_class.from_fusion_config(
        config, modalities, num_outputs=num_outputs, output_activation=output_activation, **kwargs
    )
