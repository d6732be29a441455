"""TFLite conversion of the feature-level model: float, dynamic-range and full-integer int8.

The converted model is the Keras model on *preprocessed* features (the
export's ``predict_features`` signature): decoding PNG/WAV and tokenizing
text stay outside, in the same tf.data preprocessing training uses. The raw
``serving_default`` signature is tried with TF select ops by
:func:`convert_raw_signature`, which reports what does not convert.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator

import numpy as np

from multimodal_tf.compat import tf
from multimodal_tf.data import features
from multimodal_tf.data.pipeline import make_dataset

QUANTIZATIONS = ("float", "dynamic", "int8")
# Examples of the train split the int8 converter calibrates activation ranges
# on; TF's guide suggests ~100-500, and more did not move accuracy on avmnist.
REPRESENTATIVE_EXAMPLES = 200


@dataclasses.dataclass(frozen=True)
class Conversion:
    """A TFLite flatbuffer and how it was made.

    Attributes:
        flatbuffer: the ``.tflite`` bytes.
        quantization: ``float``, ``dynamic`` or ``int8``.
        int8_only: int8 with no float fallback (every op has an int8 kernel).
        note: what the converter had to fall back to, if anything.
        kept_float: int8 only: tensors of the ops kept float because int8
            broke them (``selective.py``).
        debugger_rounds: int8 only: QuantizationDebugger runs made.
    """

    flatbuffer: bytes
    quantization: str
    int8_only: bool = False
    note: str = ""
    kept_float: tuple[str, ...] = ()
    debugger_rounds: int = 0


def feature_specs(config) -> dict:
    """The model's preprocessed-feature specs; refuses raw-string text (no TFLite/ONNX string ops)."""
    specs = features.model_feature_specs(config.data, config.model)
    for name, spec in specs.items():
        if spec.dtype == tf.string:
            raise ValueError(
                f"input {name!r} is raw text (an encoder with the text_strings input kind): its "
                "tokenizer runs inside the model, which TFLite builtins and ONNX cannot run; "
                "use a token-id text encoder"
            )
    return specs


def has_recurrent_layers(model) -> bool:
    """Whether ``model`` holds a Keras RNN layer (an LSTM text encoder)."""
    from multimodal_tf.compat import keras  # noqa: PLC0415

    return any(isinstance(layer, keras.layers.RNN) for layer in model.submodules)


def feature_function(model, config, batch_size: int | None = None):
    """``model`` on preprocessed features as a concrete function (what ``predict_features`` runs).

    Args:
        model: the Keras model.
        config: its config (the feature specs).
        batch_size: None for a dynamic batch; TFLite needs 1 (static) for a
            model with an LSTM: with a dynamic batch it lowers to TensorList
            ops the converter refuses ("requires element_shape to be
            static"); with a static one it becomes TFLite's fused LSTM.
    """
    specs = {
        name: tf.TensorSpec((batch_size, *spec.shape[1:]), spec.dtype, name=name)
        for name, spec in feature_specs(config).items()
    }
    function = tf.function(lambda model_features: model(model_features, training=False))
    return function.get_concrete_function(specs)


def representative_features(config, metadata, count: int = REPRESENTATIVE_EXAMPLES) -> Iterator[dict]:
    """Batches of one preprocessed train-split example (no augmentation), for int8 calibration."""
    dataset = make_dataset(config, "train", training=False, metadata=metadata, batch_size=1)
    specs = feature_specs(config)
    for x, _ in dataset.take(count):
        yield {name: tf.cast(x[name], spec.dtype) for name, spec in specs.items()}


def _converter(model, config):
    concrete = feature_function(model, config, 1 if has_recurrent_layers(model) else None)
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)


def convert(model, config, metadata, quantization: str, representative=None) -> Conversion:
    """The feature-level model as a TFLite flatbuffer.

    ``dynamic``: weights stored as int8, activations float (dequantized on
    the fly). ``int8``: weights and activations int8, ranges calibrated on
    REPRESENTATIVE_EXAMPLES train-split examples; inputs and outputs stay
    float32 (the converter adds quantize/dequantize at the edges) so a
    caller feeds the same features as to the float model. Ops that int8
    breaks (found by TFLite's QuantizationDebugger, ``selective.py``) and
    ops with no int8 kernel stay float; the Conversion's ``note`` and
    ``kept_float`` say which.

    Args:
        model: the Keras model.
        config: its config.
        metadata: the dataset's metadata (the train split calibrates int8).
        quantization: ``float``, ``dynamic`` or ``int8``.
        representative: for int8, a callable yielding feature dicts (batch
            of 1) to calibrate on instead of the train split (tests).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS[1:])}; got {quantization!r}")
    if quantization == "int8" and has_recurrent_layers(model):
        # Measured on TF 2.21: calibrating TFLite's fused LSTM for int8 kills
        # the process (segmentation fault), so refuse before converting.
        raise ValueError(
            "--quantize int8 does not support models with an LSTM (text/lstm): the TF 2.21 "
            "converter crashes calibrating TFLite's fused LSTM; use --quantize dynamic"
        )
    converter = _converter(model, config)
    if quantization == "float":
        return Conversion(converter.convert(), quantization)
    if quantization == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return Conversion(converter.convert(), quantization)
    return convert_int8(model, config, representative or (lambda: representative_features(config, metadata)))


def convert_int8(model, config, representative) -> Conversion:
    """Full-integer int8 with the ops int8 breaks (and those with no int8 kernel) kept float.

    The QuantizationDebugger rounds (``selective.py``) run with float
    kernels allowed. When they keep nothing float, the model is converted
    again with int8 kernels only (with float allowed, the converter leaves
    some cheap ops such as SELECT_V2 in float); only if that fails (an op
    with no int8 kernel) does the mixed model stay, and ``note`` says why.
    """
    from multimodal_tf.optimize import selective  # noqa: PLC0415

    def make_converter(int8_only: bool = False):
        converter = _converter(model, config)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        # BUILTINS too unless int8_only: the ops kept float need their float kernels.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] + (
            [] if int8_only else [tf.lite.OpsSet.TFLITE_BUILTINS]
        )
        return converter

    def debug_features():
        return itertools.islice(representative(), selective.DEBUG_EXAMPLES)

    result = selective.convert_selective(make_converter, debug_features)
    details = {"kept_float": result.kept_float, "debugger_rounds": result.rounds}
    if not result.kept_float:
        try:
            return Conversion(make_converter(int8_only=True).convert(), "int8", int8_only=True, **details)
        except Exception as error:  # noqa: BLE001  (the converter raises ConverterError or RuntimeError)
            first = str(error).strip().splitlines()[0][:300]
        note = f"not every op has an int8 kernel, those run in float ({first})"
    else:
        note = "kept float (int8 RMSE/scale above {}): {}".format(
            selective.RMSE_PER_SCALE_LIMIT,
            "; ".join(f"{e.op} {e.tensor} ({e.rmse_per_scale:.3g})" for e in result.found),
        )
    return Conversion(result.flatbuffer, "int8", int8_only=False, note=note, **details)


def float_ops(flatbuffer: bytes) -> list[str]:
    """Ops of a converted model that compute in float (not int8/int32), e.g. those kept float."""
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    details = interpreter._get_ops_details()  # noqa: SLF001  (op names and tensor ids; no public API)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = []
    for op in details:
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        outputs = [tensors[i] for i in op["outputs"] if i in tensors]
        if any(t["dtype"] == np.float32 for t in outputs):
            ops.append(op["op_name"])
    return ops


class TFLiteRunner:
    """Runs a ``.tflite`` feature-level model on feature dicts (batch of any size).

    Args:
        path_or_bytes: the ``.tflite`` file or its bytes.
        num_threads: interpreter threads; None: TFLite's default.
    """

    def __init__(self, path_or_bytes, num_threads: int | None = None):
        kwargs = {"num_threads": num_threads} if num_threads else {}
        if isinstance(path_or_bytes, bytes):
            self.interpreter = tf.lite.Interpreter(model_content=path_or_bytes, **kwargs)
        else:
            self.interpreter = tf.lite.Interpreter(model_path=str(path_or_bytes), **kwargs)
        self.runner = self.interpreter.get_signature_runner()
        self.input_details = self.runner.get_input_details()
        # A static batch of 1 (models with an LSTM, see feature_function):
        # XNNPack cannot reshape those graphs, so examples run one by one.
        self.batch_size = None
        for detail in self.input_details.values():
            if detail["shape_signature"][0] != -1:
                self.batch_size = int(detail["shape_signature"][0])

    def __call__(self, model_features: dict) -> np.ndarray:
        inputs = {}
        for name, detail in self.input_details.items():
            if name not in model_features:
                raise ValueError(f"TFLite model input {name!r} missing; got {sorted(model_features)}")
            inputs[name] = np.asarray(model_features[name]).astype(detail["dtype"])
        if self.batch_size is None:
            return self._run(inputs)
        count = len(next(iter(inputs.values())))
        step = self.batch_size
        return np.concatenate(
            [self._run({k: v[i : i + step] for k, v in inputs.items()}) for i in range(0, count, step)]
        )

    def _run(self, inputs: dict) -> np.ndarray:
        outputs = self.runner(**inputs)
        return np.asarray(next(iter(outputs.values())), np.float32)


def convert_raw_signature(saved_model_dir) -> tuple[bytes | None, str]:
    """Tries the export's raw-bytes ``serving_default`` as TFLite with select TF ops.

    The documented path for raw inputs: TFLite builtins plus TF kernels
    (``SELECT_TF_OPS``, the Flex delegate) for what TFLite lacks (PNG/WAV
    decoding, string ops). Returns ``(flatbuffer or None, message)``; the
    message names what did not convert.
    """
    from multimodal_tf.signatures import DEFAULT_SIGNATURE  # noqa: PLC0415

    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[DEFAULT_SIGNATURE]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    converter.allow_custom_ops = False
    try:
        return converter.convert(), "converted with select TF ops"
    except Exception as error:  # noqa: BLE001  (ConverterError carries the op list in its text)
        missing = sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", str(error))))
        if missing:
            return None, "ops with neither a TFLite builtin nor a Flex (select TF) kernel: " + ", ".join(
                missing
            )
        return None, str(error).strip().splitlines()[0][:500]
