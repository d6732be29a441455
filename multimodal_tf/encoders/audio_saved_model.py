"""``audio/saved_model``: a local SavedModel that maps a waveform to frame embeddings.

YAMNet, VGGish and TRILL-style models take mono 16 kHz samples in [-1, 1]
and return one embedding per frame (YAMNet: 0.96 s windows every 0.48 s,
1024 floats each). This encoder loads such a SavedModel from disk (never
downloaded), calls one of its signatures (or the object itself) on the
waveform the preprocessor hands it, and pools the frames (or returns them,
with a mask, for the cross-attention fusion). The loaded object is tracked
by the layer, so an export of the model holds the wrapped graph and its
variables, and ``export.check_ops`` sees the wrapped ops.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ConfigFieldError, DataConfig, EncoderConfig, option
from multimodal_tf.data.features import WAVEFORM
from multimodal_tf.registry import ENCODERS

POOLINGS = ("mean", "max")


@dataclasses.dataclass(frozen=True)
class AudioSavedModelConfig(EncoderConfig):
    """``audio/saved_model``: the arguments of :class:`AudioSavedModelEncoder`.

    The defaults fit YAMNet's TF2 export (signature ``serving_default``,
    input ``waveform`` [samples], output ``embeddings`` [frames, 1024]).
    """

    input_kind: ClassVar[str] = WAVEFORM

    name: str = "audio/saved_model"
    path: str = ""  # local SavedModel directory (the one holding saved_model.pb)
    signature: str = "serving_default"  # "": call the loaded object itself
    input_key: str = "waveform"  # "": pass the waveform positionally (signature "" only)
    output_key: str = "embeddings"  # a dict key, or a tuple index ("1"); ignored for a single tensor
    batched: bool = False  # True: the model takes [B, samples]; False: one [samples] clip per call
    sample_rate: int = option(16000, minimum=1)  # what the model expects; must equal data.audio.sample_rate
    sample_rate_key: str = ""  # input that also takes the sample rate (TRILL: "sample_rate")
    freeze: bool = True
    pooling: str = option("mean", choices=POOLINGS)
    output_dim: int = option(0, minimum=0)  # 0: the model's frame embeddings, no projection
    dropout_rate: float = option(0.0, minimum=0.0)

    def check_data(self, data: DataConfig) -> None:
        # The serving graph takes WAV bytes at data.audio.sample_rate and does
        # not resample (conversion does), so the two rates must agree.
        if data.audio.sample_rate != self.sample_rate:
            raise ConfigFieldError(
                "sample_rate",
                f"the SavedModel {self.path!r} takes {self.sample_rate} Hz audio but "
                f"data.audio.sample_rate is {data.audio.sample_rate} (set data.audio.sample_rate: "
                f"{self.sample_rate}; conversion resamples the clips, the serving graph does not)",
            )


def load_saved_model(path: str):
    """``tf.saved_model.load(path)``, or a ValueError naming ``path`` and what was expected."""
    if not path:
        raise ValueError("audio/saved_model needs model.audio_encoder.path: a local SavedModel directory")
    if not tf.io.gfile.isdir(path) or not tf.saved_model.contains_saved_model(path):
        raise ValueError(
            f"audio/saved_model: {path!r} is not a SavedModel directory "
            "(expected a folder holding saved_model.pb and variables/)"
        )
    return tf.saved_model.load(path)


def input_specs(function) -> dict[str, tf.TensorSpec]:
    """Input name -> spec of a signature or restored ``tf.function`` (first concrete function)."""
    concrete = getattr(function, "concrete_functions", None) or [function]
    args, kwargs = concrete[0].structured_input_signature
    specs = {spec.name: spec for spec in args if isinstance(spec, tf.TensorSpec) and spec.name}
    specs.update({name: spec for name, spec in kwargs.items() if isinstance(spec, tf.TensorSpec)})
    return specs


def captured_variables(function) -> list[tf.Variable]:
    """The variables a signature or restored ``tf.function`` reads (each once)."""
    concrete = getattr(function, "concrete_functions", None) or [function]
    variables = {}
    for function_ in concrete:
        for variable in function_.variables:
            variables.setdefault(id(variable), variable)
    return list(variables.values())


def select_output(outputs, key: str, path: str):
    """The frame-embedding tensor among a model's outputs (a dict, tuple or one tensor)."""
    if isinstance(outputs, dict):
        if key not in outputs:
            raise ValueError(
                f"audio/saved_model {path!r}: output_key {key!r} is not an output; it has {sorted(outputs)}"
            )
        return outputs[key]
    if isinstance(outputs, list | tuple):
        if not key.isdigit() or int(key) >= len(outputs):
            raise ValueError(
                f"audio/saved_model {path!r} returns a tuple of {len(outputs)} tensors: "
                f"output_key must be an index 0..{len(outputs) - 1}, got {key!r}"
            )
        return outputs[int(key)]
    return outputs


def pool_frames(frames: tf.Tensor, mask: tf.Tensor, pooling: str) -> tf.Tensor:
    """[B, F, D] frames and [B, F] bool mask -> [B, D]; 0 for a row with no valid frame."""
    valid = tf.cast(mask, frames.dtype)[:, :, None]
    if pooling == "mean":
        return tf.reduce_sum(frames * valid, axis=1) / tf.maximum(tf.reduce_sum(valid, axis=1), 1.0)
    lowest = tf.fill(tf.shape(frames), frames.dtype.min)
    pooled = tf.reduce_max(tf.where(mask[:, :, None], frames, lowest), axis=1)
    return tf.where(tf.reduce_any(mask, axis=1)[:, None], pooled, tf.zeros_like(pooled))


@ENCODERS.register("audio/saved_model", config=AudioSavedModelConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class AudioSavedModelEncoder(keras.layers.Layer):
    """A local waveform -> frame-embedding SavedModel (YAMNet, VGGish, TRILL-style) as an encoder.

    The wrapped model runs in float32 whatever the layer's dtype policy (the
    waveform is not autocast: float16 keeps 11 of 16-bit PCM's 16 bits); its
    frames are cast to the compute dtype at the boundary. A row whose
    waveform is all zeros (how the preprocessor fills an absent clip) has no
    valid frame: its mask is all False and its pooled embedding 0 (before
    the projection). The zero-padded tail of a short clip is kept as frames,
    as the wrapped model sees it.

    Call arguments:
        waveforms: float32 [B, samples] mono at ``sample_rate``, in [-1, 1].

    Returns:
        [B, D] pooled embeddings (D = ``output_dim``, or the model's frame
        size when 0); with ``sequence_output``, a tuple of [B, F, D] frames
        and their bool [B, F] mask.

    Args:
        path: the SavedModel directory.
        signature: signature to call; "" calls the loaded object itself.
        input_key: the input that takes the waveform ("" = positional, for
            signature "").
        output_key: the output holding the frame embeddings: a dict key or a
            tuple index; ignored when the model returns one tensor.
        batched: the model takes [B, samples] (else one [samples] clip per
            call, mapped over the batch).
        sample_rate: the rate the model expects (checked against the data
            config by ``AudioSavedModelConfig.check_data``).
        sample_rate_key: an input that also takes the sample rate ("" = none).
        freeze: keep the wrapped variables fixed; False trains its trainable
            ones (if the SavedModel has any).
        pooling: ``mean`` or ``max`` over valid frames.
        output_dim: a linear projection of each frame to this size (0 = none).
        dropout_rate: dropout on the output.
        sequence_output: return ``(frames, mask)`` instead of the pooled vector.
        **kwargs: standard layer arguments.

    Raises:
        ValueError: naming ``path``: not a SavedModel, an unknown signature
            or key (listing the known ones), an output that is not float
            frames of rank 2/3, a clip too short for one frame.
    """

    supports_sequence_output = True

    def __init__(
        self,
        path: str,
        signature: str = "serving_default",
        input_key: str = "waveform",
        output_key: str = "embeddings",
        batched: bool = False,
        sample_rate: int = 16000,
        sample_rate_key: str = "",
        freeze: bool = True,
        pooling: str = "mean",
        output_dim: int = 0,
        dropout_rate: float = 0.0,
        sequence_output: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if pooling not in POOLINGS or output_dim < 0:
            raise ValueError(f"{self.name}: pooling must be one of {POOLINGS} and output_dim >= 0")
        self._autocast = False  # see the class docstring
        self.path = path
        self.signature = signature
        self.input_key = input_key
        self.output_key = output_key
        self.batched = batched
        self.sample_rate = sample_rate
        self.sample_rate_key = sample_rate_key
        self.freeze = freeze
        self.pooling = pooling
        self.output_dim = output_dim
        self.dropout_rate = dropout_rate
        self.sequence_output = sequence_output
        # An attribute, so the layer tracks it: exports then hold its graph and variables.
        self.wrapped = load_saved_model(path)
        self._function = self._find_function()
        self._check_inputs()
        self.projection = keras.layers.Dense(output_dim, name="projection") if output_dim else None
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def _find_function(self):
        if not self.signature:
            if not callable(self.wrapped):
                raise ValueError(
                    f"audio/saved_model {self.path!r}: the loaded object is not callable; "
                    f"pick a signature from {sorted(self.wrapped.signatures)}"
                )
            return self.wrapped.__call__
        if self.signature not in self.wrapped.signatures:
            raise ValueError(
                f"audio/saved_model {self.path!r} has no signature {self.signature!r}; "
                f"it has {sorted(self.wrapped.signatures)} (or signature: '' to call the object)"
            )
        return self.wrapped.signatures[self.signature]

    def _check_inputs(self) -> None:
        specs = input_specs(self._function)
        wanted = [k for k in (self.input_key, self.sample_rate_key) if k]
        if self.signature and not self.input_key:
            raise ValueError(
                f"audio/saved_model {self.path!r}: a signature needs input_key; it takes {sorted(specs)}"
            )
        missing = [k for k in wanted if k not in specs]
        if missing:
            raise ValueError(
                f"audio/saved_model {self.path!r}: input {missing[0]!r} is not an input of "
                f"{self.signature or 'the loaded object'}; it takes {sorted(specs)}"
            )
        spec = specs.get(self.input_key) or next(iter(specs.values()), None)
        if spec is not None and spec.shape.rank is not None and spec.shape.rank != (2 if self.batched else 1):
            raise ValueError(
                f"audio/saved_model {self.path!r}: input {spec.name or self.input_key!r} has shape "
                f"{spec.shape} ({'one clip' if spec.shape.rank == 1 else 'a batch'}): "
                f"set batched: {'false' if spec.shape.rank == 1 else 'true'}"
            )
        self._specs = specs

    def _run(self, waveforms: tf.Tensor) -> tf.Tensor:
        """The wrapped model on [samples] (or [B, samples]): its selected float output."""
        spec = self._specs.get(self.input_key)
        waveforms = tf.cast(waveforms, spec.dtype if spec is not None else tf.float32)
        kwargs = {self.input_key: waveforms} if self.input_key else {}
        args = () if self.input_key else (waveforms,)
        if self.sample_rate_key:
            kwargs[self.sample_rate_key] = tf.constant(
                self.sample_rate, self._specs[self.sample_rate_key].dtype
            )
        return select_output(self._function(*args, **kwargs), self.output_key, self.path)

    def _run_once(self, waveforms: tf.Tensor) -> tf.Tensor:
        """``_run`` eagerly, in a replica context where a strategy needs one.

        Loaded under a MirroredStrategy's scope, the wrapped variables are
        mirrored, and its functions may read them only inside a replica.
        """
        strategy = tf.distribute.get_strategy()
        parameter_server = isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)
        if (
            not tf.distribute.has_strategy()
            or not tf.distribute.in_cross_replica_context()
            or parameter_server
        ):
            return self._run(waveforms)
        return strategy.experimental_local_results(strategy.run(self._run, (waveforms,)))[0]

    def _as_frames(self, output: tf.Tensor) -> tf.Tensor:
        """The output as float32 frames: [B, F, D] (batched) or [F, D]; one vector is one frame."""
        one_vector_rank = 2 if self.batched else 1
        if output.shape.rank == one_vector_rank:
            output = tf.expand_dims(output, -2)
        return tf.cast(output, tf.float32)

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        if input_shape.rank != 2 or input_shape[-1] is None:
            raise ValueError(
                f"{self.name}: expected [B, samples] waveforms with known samples, got {input_shape}"
            )
        self.num_frames, self.frame_dim = self._probe(int(input_shape[-1]))
        for variable in captured_variables(self._function):
            if variable.trainable and not self.freeze:
                self.add_weight(
                    name=variable.name.split(":")[0],
                    shape=variable.shape,
                    dtype=variable.dtype,
                    trainable=True,
                    experimental_autocast=False,
                    getter=lambda *_, variable=variable, **__: variable,  # the existing variable
                )
        if self.projection is not None:
            with tf.name_scope(self.projection.name):
                self.projection.build(tf.TensorShape([None, self.frame_dim]))
        super().build(input_shape)

    def _probe(self, samples: int) -> tuple[int, int]:
        """Runs the model once on silence: (frames, frame size), or a ValueError saying what is wrong."""
        with tf.init_scope():  # eager, even when Keras builds the layer inside a graph
            silence = tf.zeros([1, samples] if self.batched else [samples], tf.float32)
            try:
                output = self._run_once(silence)
            except (TypeError, ValueError, tf.errors.InvalidArgumentError) as error:
                if self.path in str(error):  # already ours (select_output)
                    raise
                raise ValueError(
                    f"audio/saved_model {self.path!r} failed on a [{'1, ' * self.batched}{samples}] float32 "
                    f"waveform: {error}"
                ) from None
        expected_ranks = (2, 3) if self.batched else (1, 2)
        if not isinstance(output, tf.Tensor) or not output.dtype.is_floating:
            raise ValueError(
                f"audio/saved_model {self.path!r}: output {self.output_key!r} must be a float tensor, "
                f"got {getattr(output, 'dtype', type(output).__name__)}"
            )
        if output.shape.rank not in expected_ranks:
            raise ValueError(
                f"audio/saved_model {self.path!r}: output {self.output_key!r} has shape {output.shape}; "
                f"expected rank {expected_ranks[0]} or {expected_ranks[1]} (frame embeddings"
                f"{' of a batch' if self.batched else ''})"
            )
        frames = self._as_frames(output)
        num_frames, frame_dim = int(frames.shape[-2]), int(frames.shape[-1])
        if num_frames < 1:
            raise ValueError(
                f"audio/saved_model {self.path!r} gives no frame for {samples} samples "
                f"({samples / self.sample_rate:.3f} s): raise data.audio.duration_seconds"
            )
        return num_frames, frame_dim

    def frames(self, waveforms: tf.Tensor) -> tf.Tensor:
        """[B, samples] -> the wrapped model's float32 [B, F, D] frame embeddings."""
        if self.batched:
            frames = self._as_frames(self._run(waveforms))
        else:
            spec = tf.TensorSpec([self.num_frames, self.frame_dim], tf.float32)
            frames = tf.map_fn(
                lambda clip: self._as_frames(self._run(clip)), waveforms, fn_output_signature=spec
            )
        return tf.ensure_shape(frames, [None, self.num_frames, self.frame_dim])

    def call(self, waveforms: tf.Tensor, training=None):
        waveforms = tf.cast(waveforms, tf.float32)
        frames = self.frames(waveforms)
        present = tf.reduce_any(tf.not_equal(waveforms, 0.0), axis=1)  # [B]: all-zero = absent
        mask = tf.broadcast_to(present[:, None], tf.shape(frames)[:2])
        x = frames if self.sequence_output else pool_frames(frames, mask, self.pooling)
        if self.projection is not None:
            x = self.projection(x)
        x = self.dropout(tf.cast(x, self.compute_dtype), training=training)
        return (x, mask) if self.sequence_output else x

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "path": self.path,
                "signature": self.signature,
                "input_key": self.input_key,
                "output_key": self.output_key,
                "batched": self.batched,
                "sample_rate": self.sample_rate,
                "sample_rate_key": self.sample_rate_key,
                "freeze": self.freeze,
                "pooling": self.pooling,
                "output_dim": self.output_dim,
                "dropout_rate": self.dropout_rate,
                "sequence_output": self.sequence_output,
            }
        )
        return config
