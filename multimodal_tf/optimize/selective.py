"""Selective int8 quantization: ops that int8 breaks stay float, found by TFLite's QuantizationDebugger.

Full-integer conversion quantizes every op with an int8 kernel. Some ops
are broken by it whatever the calibration: on emoji3 the colour histogram's
``ONE_HOT`` came out of int8 with an RMSE of 0.5 on a 0/1 output (128
quantization steps), the image branch's features were garbage and accuracy
fell from 0.697 to 0.26 (docs/optimization.md). The debugger measures, per
quantized tensor, the error against the same op run in float on the same
(dequantized) inputs; :func:`convert_selective` keeps the first op whose
error is far above rounding noise in float and measures again, until none is.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Iterator

from multimodal_tf.compat import tf

# RMSE over the tensor's quantization step (scale). Rounding alone gives
# 1/sqrt(12) = 0.29; TF's selective-quantization guide flags layers above 0.7.
RMSE_PER_SCALE_LIMIT = 0.7
# Examples the debugger runs each round (it runs the float and int8 models
# op by op, so it costs ~50x a forward pass); errors of a broken op show on any.
DEBUG_EXAMPLES = 32
# Rounds of "keep the first broken op float, measure again". Each costs a
# conversion and a debugger run; models here have had at most two broken ops.
MAX_ROUNDS = 6


@dataclasses.dataclass(frozen=True)
class LayerError:
    """One quantized tensor's error as the debugger measured it."""

    tensor: str
    op: str
    rmse_per_scale: float
    rmse: float
    range: float  # 255 * scale: the float interval the int8 tensor covers


@dataclasses.dataclass(frozen=True)
class SelectiveConversion:
    """A selectively quantized flatbuffer and the debugger's findings.

    Attributes:
        flatbuffer: the ``.tflite`` bytes (int8 except ``kept_float``).
        kept_float: tensor names of the ops kept in float, in the order found.
        found: the error of each kept op when it was found (int8).
        rounds: debugger runs made.
    """

    flatbuffer: bytes
    kept_float: tuple[str, ...]
    found: tuple[LayerError, ...]
    rounds: int


def layer_errors(debugger) -> list[LayerError]:
    """The debugger's per-layer statistics, in execution order."""
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    errors = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale, rmse = float(row["scale"]), math.sqrt(float(row["mean_squared_error"]))
        errors.append(
            LayerError(row["tensor_name"], row["op_name"], rmse / scale if scale else 0.0, rmse, 255 * scale)
        )
    return errors


def convert_selective(
    make_converter: Callable,
    debug_features: Callable[[], Iterator[dict]],
    limit: float = RMSE_PER_SCALE_LIMIT,
) -> SelectiveConversion:
    """int8 TFLite with the ops that int8 breaks kept in float.

    Each round the debugger measures every quantized tensor; the first one
    (in execution order) above ``limit`` is kept float. Only the first:
    a broken op feeds garbage to the ops after it, which saturate and look
    broken too, so they are judged again once it is fixed.

    Args:
        make_converter: returns a fresh TFLiteConverter set up for int8
            (optimizations, representative dataset, supported ops).
        debug_features: yields feature dicts (batch of 1) to measure on.
        limit: RMSE / scale above which an op counts as broken.
    """
    kept, found = [], []
    for round_number in range(1, MAX_ROUNDS + 1):
        debugger = _debugger(make_converter(), debug_features, kept)
        debugger.run()
        broken = [e for e in layer_errors(debugger) if e.rmse_per_scale > limit and e.tensor not in kept]
        if not broken or round_number == MAX_ROUNDS:
            return SelectiveConversion(
                debugger.get_nondebug_quantized_model(), tuple(kept), tuple(found), round_number
            )
        kept.append(broken[0].tensor)
        found.append(broken[0])
    raise AssertionError("unreachable")


def _debugger(converter, debug_features: Callable[[], Iterator[dict]], denylist: list[str]):
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(denylist) or None)
    holder = {}

    def dataset():
        # The debugger feeds inputs positionally, in its int8 interpreter's
        # input order; names there are "serving_default_<feature>".
        details = holder["debugger"]._quant_interpreter.get_input_details()  # noqa: SLF001
        for features in debug_features():
            order = [_feature_for(d["name"], features) for d in details]
            yield [features[name].numpy() for name in order]

    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=dataset, debug_options=options
    )
    holder["debugger"] = debugger
    return debugger


def _feature_for(input_name: str, features: dict) -> str:
    """The feature whose name ends ``input_name`` (the longest: ``image_present`` before ``image``)."""
    stem = input_name.split(":")[0]
    matches = [name for name in features if stem.endswith(name)]
    if not matches:
        raise ValueError(f"TFLite input {input_name!r} matches no feature of {sorted(features)}")
    return max(matches, key=len)
