"""``image/keras_model``: any local Keras model file, cut at a named layer, as an image encoder.

The model's input scaling is named in the config (:data:`SCALINGS`) and runs
in the graph; resizing, pooling, freezing and BatchNorm handling are
:class:`~multimodal_tf.encoders.backbones.BackboneEncoder`'s.
"""

from __future__ import annotations

import dataclasses
import os

from multimodal_tf.compat import keras
from multimodal_tf.config import EncoderConfig, MissingFileError, option
from multimodal_tf.encoders.backbones import BackboneEncoder
from multimodal_tf.registry import ENCODERS

# ``image/keras_model`` input scalings, on pixels in [0, 1] (data/image.py):
# unit = as they are; none = 0..255; caffe / tf / torch = 0..255 through
# keras.applications.imagenet_utils.preprocess_input in that mode.
SCALINGS = ("unit", "none", "caffe", "tf", "torch")


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
            raise MissingFileError("path", f"no such file or folder {self.path!r} (a Keras model file)")


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
