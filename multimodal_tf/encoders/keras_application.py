"""``image/keras_application``: a Keras Applications CNN with local ImageNet weights.

Builds one of tf_keras's own ``keras.applications`` constructors
(``include_top=False``, ``weights=None``: nothing is ever downloaded) and
loads a local ``*_notop.h5`` file into it. Resizing, pooling, freezing and
BatchNorm handling are :class:`~multimodal_tf.encoders.backbones.BackboneEncoder`'s.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple

from multimodal_tf.compat import keras
from multimodal_tf.config import ConfigFieldError, EncoderConfig, option
from multimodal_tf.encoders.backbones import BackboneEncoder, check_weights_file, load_backbone_weights
from multimodal_tf.registry import ENCODERS


class Architecture(NamedTuple):
    """A ``keras.applications`` backbone: its preprocessing module, minimum input and weights file."""

    module: str  # keras.applications.<module>.preprocess_input
    min_size: int  # smallest input height/width the constructor accepts
    notop_file: str  # the file tf_keras would download for weights="imagenet", include_top=False


# MobileNetV3, EfficientNet(V2) and ConvNeXt carry their own rescaling layer
# (``include_preprocessing=True``, the default) and their ``preprocess_input``
# is the identity: feeding every backbone 0..255 pixels through its own
# ``preprocess_input`` never preprocesses twice.
ARCHITECTURES = {
    "ResNet50": Architecture("resnet", 32, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "ResNet101": Architecture("resnet", 32, "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "ResNet50V2": Architecture("resnet_v2", 32, "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "ResNet101V2": Architecture("resnet_v2", 32, "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "MobileNetV2": Architecture(
        "mobilenet_v2", 32, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    ),
    "MobileNetV3Small": Architecture(
        "mobilenet_v3", 32, "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    ),
    "MobileNetV3Large": Architecture(
        "mobilenet_v3", 32, "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"
    ),
    "EfficientNetB0": Architecture("efficientnet", 32, "efficientnetb0_notop.h5"),
    "EfficientNetV2B0": Architecture("efficientnet_v2", 32, "efficientnetv2-b0_notop.h5"),
    "EfficientNetV2S": Architecture("efficientnet_v2", 32, "efficientnetv2-s_notop.h5"),
    "DenseNet121": Architecture("densenet", 32, "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "InceptionV3": Architecture(
        "inception_v3", 75, "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    ),
    "Xception": Architecture("xception", 71, "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "VGG16": Architecture("vgg16", 32, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "ConvNeXtTiny": Architecture("convnext", 32, "convnext_tiny_notop.h5"),
}
# Constructor arguments the encoder itself decides.
RESERVED_ARGUMENTS = ("include_top", "weights", "input_tensor", "input_shape", "pooling", "classes")


@dataclasses.dataclass(frozen=True)
class KerasApplicationConfig(EncoderConfig):
    """``image/keras_application``: the arguments of :class:`KerasApplicationEncoder`."""

    name: str = "image/keras_application"
    architecture: str = option("ResNet50V2", choices=tuple(ARCHITECTURES))
    weights: str = ""  # local include_top=False .h5 file (see ARCHITECTURES); "" = random init
    # Extra constructor arguments, e.g. {alpha: 0.75, minimalistic: true} for MobileNetV3.
    architecture_arguments: dict[str, Any] = dataclasses.field(default_factory=dict)
    freeze: bool = True
    trainable_layers: int = option(0, minimum=0)  # when trained: only the top N weighted layers (0 = all)
    input_size: int = option(224, minimum=1)  # backbone input height = width (images are resized to it)
    pooling: str = option("avg", choices=("avg", "max"))
    # "auto": inference mode when frozen or pretrained (weights set), else trained.
    batch_norm: str = option("auto", choices=("auto", "inference", "train"))
    output_dim: int = option(0, minimum=0)  # projection after pooling (0 = the backbone's channels)
    dropout_rate: float = option(0.0, minimum=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        architecture = ARCHITECTURES[self.architecture]
        if self.input_size < architecture.min_size:
            raise ConfigFieldError(
                "input_size",
                f"{self.architecture} takes inputs of at least {architecture.min_size}x"
                f"{architecture.min_size}, got {self.input_size}",
            )
        accepted = set(inspect.signature(getattr(keras.applications, self.architecture)).parameters)
        bad = sorted(set(self.architecture_arguments) - (accepted - set(RESERVED_ARGUMENTS)))
        if bad:
            raise ConfigFieldError(
                "architecture_arguments",
                f"{self.architecture} does not take {bad} here; it takes "
                f"{sorted(accepted - set(RESERVED_ARGUMENTS))}",
            )
        check_weights_file(self.weights)


@ENCODERS.register("image/keras_application", config=KerasApplicationConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class KerasApplicationEncoder(BackboneEncoder):
    """A ``keras.applications`` CNN (its own preprocessing in the graph), pooled or as regions.

    Call arguments:
        images: float32 [B, H, W, 3] in [0, 1] (zeros for an absent image);
            resized to ``input_size`` x ``input_size``.

    Returns:
        [B, D] pooled features (D = ``output_dim`` or the backbone's channels),
        or with ``sequence_output`` a tuple ([B, h*w, D] regions of the last
        feature map, bool [B, h*w] mask, all True).

    Args:
        architecture: a key of :data:`ARCHITECTURES` (a ``keras.applications``
            constructor name).
        weights: local ``include_top=False`` ``.h5`` weights (the file
            ``ARCHITECTURES[architecture].notop_file`` names); "" = random.
        architecture_arguments: further constructor arguments (``alpha``...).
        freeze: keep the backbone's weights fixed.
        trainable_layers: when the backbone is trained, only its top N layers
            with weights are (0 = all).
        input_size: backbone input height and width.
        pooling: ``avg`` or ``max`` over the last feature map.
        batch_norm: ``auto`` (inference mode when frozen or pretrained),
            ``inference`` or ``train``.
        output_dim: a linear projection after pooling (0 = none).
        dropout_rate: dropout on the output.
        sequence_output: return the regions and mask instead of pooling.
        **kwargs: standard layer arguments.
    """

    def __init__(
        self,
        architecture: str = "ResNet50V2",
        weights: str = "",
        architecture_arguments: dict | None = None,
        freeze: bool = True,
        trainable_layers: int = 0,
        input_size: int = 224,
        pooling: str = "avg",
        batch_norm: str = "auto",
        output_dim: int = 0,
        dropout_rate: float = 0.0,
        sequence_output: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Validated once, with the messages the config gives.
        KerasApplicationConfig(
            architecture=architecture,
            weights=weights,
            architecture_arguments=dict(architecture_arguments or {}),
            input_size=input_size,
            pooling=pooling,
            batch_norm=batch_norm,
        )
        self.architecture = architecture
        self.weights_path = weights
        self.architecture_arguments = dict(architecture_arguments or {})
        self.freeze = freeze
        self.trainable_layers = trainable_layers
        self.input_size = input_size
        self.batch_norm = batch_norm
        self.batch_norm_inference = batch_norm == "inference" or (
            batch_norm == "auto" and (freeze or weights)
        )
        self._init_head(output_dim, dropout_rate, sequence_output, pooling)
        module = getattr(keras.applications, ARCHITECTURES[architecture].module)
        self.scale = lambda pixels: module.preprocess_input(pixels * 255.0)
        self.backbone = getattr(keras.applications, architecture)(
            include_top=False,
            weights=None,
            input_shape=(input_size, input_size, 3),
            **self.architecture_arguments,
        )
        if weights:
            expected = (
                f"{architecture} with include_top=False (e.g. {ARCHITECTURES[architecture].notop_file})"
            )
            load_backbone_weights(self.backbone, weights, expected)
        self.set_backbone_trainable(not freeze)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "architecture": self.architecture,
                "weights": self.weights_path,
                "architecture_arguments": dict(self.architecture_arguments),
                "batch_norm": self.batch_norm,
            }
        )
        return config
