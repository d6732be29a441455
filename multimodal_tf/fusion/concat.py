"""Feature-level fusion by concatenation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import FusionConfig
from multimodal_tf.fusion.base import FusionLayer, zero_absent
from multimodal_tf.registry import FUSIONS


@dataclasses.dataclass(frozen=True)
class ConcatFusionConfig(FusionConfig):
    """``concat``: no fields (the layer has no weights)."""

    name: str = "concat"


@FUSIONS.register("concat", config=ConcatFusionConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class ConcatFusion(FusionLayer):
    """Concatenates the modality embeddings and their presence flags.

    Feature-level ("early") fusion as in Ngiam et al., 2011, "Multimodal Deep
    Learning": the classifier sees one joint vector. An absent modality's slot
    is zeroed, and the presence flags are appended so the head can tell "absent"
    from "present with a zero embedding".

    Call arguments:
        embeddings: dict modality -> float [B, D_m].
        presence: dict modality -> float 0/1 [B].

    Returns:
        [B, sum(D_m) + M]: the masked embeddings in ``modalities`` order, then
        the M presence flags. The layer has no weights.

    Args:
        modalities: modality names, in concatenation order.
        **kwargs: standard layer arguments.
    """

    def __init__(self, modalities: Sequence[str], **kwargs):
        super().__init__(modalities, **kwargs)

    def call(self, embeddings, presence, training=None):
        self._check_keys(embeddings, presence)
        parts = [zero_absent(embeddings[m], presence[m]) for m in self.modalities]
        parts.append(self.stacked_presence(presence))
        return tf.concat(parts, axis=-1)
