"""Pretrained CNN image encoders: Keras Applications backbones and any local Keras model.

``image/keras_application`` builds one of tf_keras's own ``keras.applications``
constructors (``include_top=False``, ``weights=None``: nothing is ever
downloaded) and loads a local ``*_notop.h5`` file into it; ``image/keras_model``
cuts a user's own Keras model file at a named layer. Both put the backbone's
input preprocessing in the graph, so the serving signature preprocesses as
training did, and both can return the spatial feature map as a sequence of
regions (for token-level cross-attention fusion).

Freezing follows the standard Keras transfer-learning recipe (Chollet,
"Transfer learning & fine-tuning", keras.io): a frozen backbone, and a
pretrained one even once unfrozen, runs its BatchNorm layers in inference
mode, so a few small batches do not wreck statistics learnt on ImageNet.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, NamedTuple

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ConfigFieldError, EncoderConfig, option
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
# ``image/keras_model`` input scalings, on pixels in [0, 1] (data/image.py):
# unit = as they are; none = 0..255; caffe / tf / torch = 0..255 through
# keras.applications.imagenet_utils.preprocess_input in that mode.
SCALINGS = ("unit", "none", "caffe", "tf", "torch")


def check_weights_file(path: str, key: str = "weights") -> None:
    """Raises ConfigFieldError when ``path`` is set but is not an existing file."""
    if path and not os.path.isfile(path):
        raise ConfigFieldError(
            key, f"no such file {path!r} (a local Keras weights file; nothing is downloaded)"
        )


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


def pool_or_sequence(feature_map: tf.Tensor, pooling: str, sequence_output: bool):
    """[B, h, w, C] -> pooled [B, C], or ([B, h*w, C] regions, all-True [B, h*w] mask)."""
    if sequence_output:
        shape = tf.shape(feature_map)
        regions = tf.reshape(feature_map, [shape[0], shape[1] * shape[2], feature_map.shape[-1]])
        return regions, tf.ones(tf.shape(regions)[:2], tf.bool)
    reduce = tf.reduce_mean if pooling == "avg" else tf.reduce_max
    return reduce(feature_map, axis=[1, 2])


class BackboneEncoder(keras.layers.Layer):
    """What both backbone families share: resize, preprocess, backbone, pool, project.

    Subclasses set ``self.backbone`` (a functional model on [B, S, S, C]) and
    ``self.scale`` (pixels in [0, 1] -> the backbone's input) in ``__init__``.
    The recipe's two-phase fine-tuning calls :meth:`set_backbone_trainable`.
    """

    supports_sequence_output = True

    def _init_head(self, output_dim, dropout_rate, sequence_output, pooling) -> None:
        self.output_dim = output_dim
        self.dropout_rate = dropout_rate
        self.sequence_output = sequence_output
        self.pooling = pooling
        self.projection = keras.layers.Dense(output_dim, name="projection") if output_dim else None
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freezes the backbone, or makes its top ``trainable_layers`` weighted layers trainable.

        In BatchNorm inference mode the BatchNorm layers stay frozen too, as
        in the Keras fine-tuning guide (their gamma/beta were fit to the
        statistics they are frozen with).
        """
        self.backbone.trainable = trainable  # recursive: every sublayer
        if not trainable:
            return
        weighted = [layer for layer in self.backbone.layers if layer.weights]
        for layer in weighted[: -self.trainable_layers] if self.trainable_layers else []:
            layer.trainable = False
        if self.batch_norm_inference:
            for layer in self.backbone.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False

    def build(self, input_shape) -> None:
        expected = self.backbone.input_shape[-1]
        if input_shape[-1] != expected:
            raise ValueError(
                f"{self.name}: the backbone takes {expected}-channel images; set data.image.channels="
                f"{expected} (got {input_shape[-1]})"
            )
        super().build(input_shape)

    def call(self, images: tf.Tensor, training=None):
        size = self.backbone.input_shape[1:3]
        x = images
        if tuple(x.shape[1:3]) != tuple(size):
            x = tf.image.resize(x, size)
        x = self.scale(tf.cast(x, self.compute_dtype))
        # training=False keeps BatchNorm (and any dropout inside) in inference mode.
        x = self.backbone(x, training=False if self.batch_norm_inference else training)
        if len(x.shape) == 2:  # an already pooled model output: one region
            x = x[:, None, None, :]
        elif len(x.shape) == 3:  # a sequence output [B, T, C]: T regions of one row
            x = x[:, None, :, :]
        out = pool_or_sequence(x, self.pooling, self.sequence_output)
        if self.sequence_output:
            regions, mask = out
            if self.projection is not None:
                regions = self.projection(regions)
            return self.dropout(regions, training=training), mask
        if self.projection is not None:
            out = self.projection(out)
        return self.dropout(out, training=training)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "output_dim": self.output_dim,
                "dropout_rate": self.dropout_rate,
                "sequence_output": self.sequence_output,
                "pooling": self.pooling,
                "freeze": self.freeze,
                "trainable_layers": self.trainable_layers,
                "input_size": self.input_size,
            }
        )
        return config


def load_backbone_weights(backbone: keras.Model, path: str, expected: str) -> None:
    """Loads a .h5 weights file into ``backbone``; a file of another architecture names both."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} not found (expected a local {expected} file)")
    try:
        backbone.load_weights(path)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(
            f"weights file {path!r} does not fit {expected}: {str(error).splitlines()[0][:300]}"
        ) from None


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


@dataclasses.dataclass(frozen=True)
class KerasModelConfig(EncoderConfig):
    """``image/keras_model``: the arguments of :class:`KerasModelEncoder`."""

    name: str = "image/keras_model"
    path: str = ""  # a .h5 / .keras file or SavedModel folder that tf_keras loads
    output_layer: str = ""  # the layer whose output is the feature map ("" = the model's output)
    freeze: bool = True
    trainable_layers: int = option(0, minimum=0)
    input_size: int = option(0, minimum=0)  # 0 = the model's own input size
    preprocessing: str = option("unit", choices=SCALINGS)
    pooling: str = option("avg", choices=("avg", "max"))
    batch_norm: str = option("auto", choices=("auto", "inference", "train"))
    output_dim: int = option(0, minimum=0)
    dropout_rate: float = option(0.0, minimum=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.path and not os.path.exists(self.path):  # "" (the default) fails when the layer is built
            raise ConfigFieldError("path", f"no such file or folder {self.path!r} (a Keras model file)")


def scaling(mode: str):
    """Pixels in [0, 1] -> the input of a model trained with ``mode`` (see SCALINGS)."""
    if mode == "unit":
        return lambda pixels: pixels
    if mode == "none":
        return lambda pixels: pixels * 255.0
    preprocess = keras.applications.imagenet_utils.preprocess_input
    return lambda pixels: preprocess(pixels * 255.0, mode=mode)


def cut_model(path: str, output_layer: str, input_size: int) -> keras.Model:
    """The Keras model at ``path`` up to ``output_layer``, on inputs of ``input_size`` (0 = its own)."""
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # h5py, SavedModel and deserialisation errors alike
        raise ValueError(
            f"cannot load a Keras model from {path!r}: {str(error).splitlines()[0][:300]}"
        ) from None
    if output_layer:
        names = [layer.name for layer in model.layers]
        if output_layer not in names:
            shown = ", ".join(names[-12:])
            raise ValueError(
                f"{path!r} has no layer {output_layer!r}; its last layers are: {shown} ({len(names)} in all)"
            )
        model = keras.Model(model.inputs, model.get_layer(output_layer).output, name="backbone")
    height, width, channels = model.input_shape[1:4]
    if input_size and (height, width) not in ((input_size, input_size), (None, None)):
        raise ValueError(f"{path!r} takes {height}x{width} inputs; input_size {input_size} cannot be used")
    if not input_size and (height is None or width is None):
        raise ValueError(f"{path!r} takes inputs of any size: set input_size")
    size = input_size or height
    if (height, width) == (None, None):  # rebuild on a fixed size (region count known in the graph)
        inputs = keras.Input((size, size, channels))
        model = keras.Model(inputs, model(inputs), name="backbone")
    return model


@ENCODERS.register("image/keras_model", config=KerasModelConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class KerasModelEncoder(BackboneEncoder):
    """A local Keras model, cut at a named layer, as an image encoder.

    Call arguments:
        images: float32 [B, H, W, C] in [0, 1]; C must be the model's input
            channels (``data.image.channels``); resized to its input size.

    Returns:
        [B, D] pooled features (a 4-D feature map is pooled, a 2-D output
        taken as is), or with ``sequence_output`` ([B, T, D], bool [B, T]).

    Args:
        path: the model file (``.h5``, ``.keras``) or SavedModel folder.
        output_layer: name of the layer to cut at ("" = the model's output).
        freeze, trainable_layers, batch_norm, pooling, output_dim,
            dropout_rate, sequence_output: as :class:`KerasApplicationEncoder`
            (``batch_norm`` ``auto`` = inference mode when frozen; the model
            is taken to be pretrained, so also when trained).
        input_size: the backbone input size (0 = the model's own).
        preprocessing: how [0, 1] pixels are scaled for it (:data:`SCALINGS`).
        **kwargs: standard layer arguments.
    """

    def __init__(
        self,
        path: str = "",
        output_layer: str = "",
        freeze: bool = True,
        trainable_layers: int = 0,
        input_size: int = 0,
        preprocessing: str = "unit",
        pooling: str = "avg",
        batch_norm: str = "auto",
        output_dim: int = 0,
        dropout_rate: float = 0.0,
        sequence_output: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        KerasModelConfig(path=path, preprocessing=preprocessing, pooling=pooling, batch_norm=batch_norm)
        if not path:
            raise ValueError(f"{self.name}: image/keras_model needs path, a local Keras model file")
        self.path = path
        self.output_layer = output_layer
        self.freeze = freeze
        self.trainable_layers = trainable_layers
        self.input_size = input_size
        self.preprocessing = preprocessing
        self.batch_norm = batch_norm
        self.batch_norm_inference = batch_norm != "train"  # a loaded model is pretrained
        self._init_head(output_dim, dropout_rate, sequence_output, pooling)
        self.scale = scaling(preprocessing)
        self.backbone = cut_model(path, output_layer, input_size)
        self.set_backbone_trainable(not freeze)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "path": self.path,
                "output_layer": self.output_layer,
                "preprocessing": self.preprocessing,
                "batch_norm": self.batch_norm,
            }
        )
        return config
