"""TF Serving's REST JSON encoding of tensors and examples.

Row format ``{"instances": [...]}`` (one item per example; an object when the
signature has several inputs) and columnar ``{"inputs": ...}`` (whole
tensors). Binary strings travel as ``{"b64": "..."}``; string outputs whose
name ends in ``_bytes`` are returned that way too, as TF Serving does.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from multimodal_tf.compat import tf
from multimodal_tf.serving.errors import invalid_argument

ROW, COLUMNAR = "row", "columnar"
# Deeper nesting than any tensor rank TF supports (TF's limit is 254) is
# refused before it can exhaust the interpreter's recursion limit.
MAX_NESTING = 64
_WHITESPACE = re.compile(rb"[\t\n\v\f\r ]+")


def parse_body(body: bytes) -> dict:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise invalid_argument(f"JSON Parse error: {e}") from None
    if not isinstance(document, dict):
        raise invalid_argument("JSON Value: request body must be a JSON object")
    return document


def _b64(value: dict, where: str) -> bytes:
    if set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise invalid_argument(f'{where}: a JSON object value must be {{"b64": "<base64 string>"}}')
    # As absl::Base64Unescape (TF Serving): whitespace (wrapped lines) is
    # skipped and the trailing '=' padding is optional.
    try:
        text = _WHITESPACE.sub(b"", value["b64"].encode("ascii"))
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise invalid_argument(f"{where}: invalid base64 ({e})") from None


def _flatten(value: Any, where: str, depth: int = 0) -> tuple[list, list[int]]:
    """Nested lists -> (flat leaves, shape); rejects ragged and over-deep nesting."""
    if not isinstance(value, list):
        return [value], []
    if depth >= MAX_NESTING:
        raise invalid_argument(f"{where}: lists nested more than {MAX_NESTING} deep")
    if not value:
        return [], [0]
    parts = [_flatten(item, where, depth + 1) for item in value]
    shape = parts[0][1]
    if any(p[1] != shape for p in parts):
        raise invalid_argument(
            f"{where}: nested lists must be rectangular (ragged tensors are not supported)"
        )
    return [leaf for p in parts for leaf in p[0]], [len(value)] + shape


def _leaf(value: Any, dtype: tf.DType, where: str):
    if dtype == tf.string:
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, dict):
            return _b64(value, where)
        raise invalid_argument(f'{where}: expected a string or {{"b64": ...}}, got {type(value).__name__}')
    if dtype == tf.bool:
        if isinstance(value, bool):
            return value
        raise invalid_argument(f"{where}: expected true/false, got {type(value).__name__}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_argument(
            f"{where}: expected a number for dtype {dtype.name}, got {type(value).__name__}"
        )
    if dtype.is_integer and not (isinstance(value, int) or float(value).is_integer()):
        raise invalid_argument(f"{where}: expected an integer for dtype {dtype.name}, got {value}")
    return value


def to_array(value: Any, dtype: tf.DType, where: str) -> np.ndarray:
    """A JSON value -> numpy array of ``dtype`` (the signature input's dtype)."""
    leaves, shape = _flatten(value, where)
    converted = [_leaf(leaf, dtype, where) for leaf in leaves]
    if dtype == tf.string:
        array = np.empty(len(converted), dtype=object)
        array[:] = converted
        return array.reshape(shape)
    try:
        array = np.array(converted, dtype=dtype.as_numpy_dtype)
    except (OverflowError, ValueError, TypeError) as e:
        raise invalid_argument(f"{where}: cannot convert to {dtype.name}: {e}") from None
    return array.reshape(shape)


def _dtype_of(signature: meta_graph_pb2.SignatureDef, name: str) -> tf.DType:
    if name not in signature.inputs:
        raise invalid_argument(
            f"input tensor alias not found in signature: {name}. "
            f"Inputs expected to be in the set {{{','.join(sorted(signature.inputs))}}}."
        )
    return tf.dtypes.as_dtype(signature.inputs[name].dtype)


def _is_named(value: Any) -> bool:
    return isinstance(value, dict) and set(value) != {"b64"}


def predict_inputs(
    document: dict, signature: meta_graph_pb2.SignatureDef, optional: Collection[str] = ()
) -> tuple[dict[str, np.ndarray], str]:
    """A predict request body -> (numpy inputs, ROW or COLUMNAR); ``optional`` inputs may be absent."""
    if ("instances" in document) == ("inputs" in document):
        raise invalid_argument(
            "Missing 'inputs' or 'instances' key"
            if "instances" not in document
            else "Only one of 'inputs' or 'instances' may be given"
        )
    required = [name for name in signature.inputs if name not in optional]
    if "inputs" in document:
        value = document["inputs"]
        if not _is_named(value):
            if len(required) != 1:
                raise invalid_argument(
                    f"'inputs' must be an object naming the inputs {sorted(signature.inputs)}"
                )
            value = {required[0]: value}
        # Keys the signature does not name are ignored, as TF Serving does.
        missing = sorted(set(signature.inputs) - set(value) - set(optional))
        if missing:
            raise invalid_argument(f"Missing named input: {missing[0]} in 'inputs' object.")
        return {
            name: to_array(value[name], _dtype_of(signature, name), f"inputs['{name}']")
            for name in signature.inputs
            if name in value
        }, COLUMNAR
    instances = document["instances"]
    if not isinstance(instances, list):
        raise invalid_argument("'instances' must be a list")
    if not instances:
        raise invalid_argument("'instances' is empty")
    if not _is_named(instances[0]):
        if len(required) != 1:
            raise invalid_argument(
                f"each instance must be an object naming the inputs {sorted(signature.inputs)}"
            )
        name = required[0]
        return {name: to_array(instances, _dtype_of(signature, name), f"instances[*]['{name}']")}, ROW
    names = set(instances[0])
    for index, instance in enumerate(instances):
        if not _is_named(instance) or set(instance) != names:
            raise invalid_argument(
                f"instances[{index}]: every instance must be an object with the keys {sorted(names)}"
            )
    inputs = {}
    for name in sorted(names):
        inputs[name] = to_array(
            [i[name] for i in instances], _dtype_of(signature, name), f"instances[*]['{name}']"
        )
    return inputs, ROW


def _json_value(name: str, array: np.ndarray) -> Any:
    if array.dtype != object:
        return array.tolist()
    as_bytes = name.endswith("_bytes")

    def encode(item):
        if isinstance(item, bytes):
            if not as_bytes:
                try:
                    return item.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(item).decode("ascii")}
        return item

    return np.frompyfunc(encode, 1, 1)(array).tolist() if array.ndim else encode(array.item())


def predict_response(outputs: Mapping[str, np.ndarray], layout: str) -> dict:
    """Outputs -> ``{"predictions": [...]}`` (row) or ``{"outputs": ...}`` (columnar)."""
    if layout == COLUMNAR:
        if len(outputs) == 1:
            ((name, value),) = outputs.items()
            return {"outputs": _json_value(name, value)}
        return {"outputs": {name: _json_value(name, value) for name, value in outputs.items()}}
    sizes = {name: (value.shape[0] if value.ndim else None) for name, value in outputs.items()}
    batch = next(iter(sizes.values()), 0)
    for name, size in sizes.items():
        if size != batch:
            raise invalid_argument(
                f"Tensor name: {name} has inconsistent batch size: {size} expecting: {batch}"
            )
    columns = {name: _json_value(name, value) for name, value in outputs.items()}
    if len(columns) == 1:
        return {"predictions": next(iter(columns.values()))}
    return {"predictions": [{name: column[i] for name, column in columns.items()} for i in range(batch or 0)]}


def _feature(value: Any, where: str) -> tf.train.Feature:
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, str | dict) for v in values):
        strings = [_leaf(v, tf.string, where) for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=strings))
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise invalid_argument(f'{where}: feature values must be strings, {{"b64": ...}}, or numbers')
    if all(isinstance(v, int) for v in values):
        if any(not -(2**63) <= v < 2**63 for v in values):
            raise invalid_argument(f"{where}: integer out of int64 range")
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _example(value: Any, where: str) -> tf.train.Example:
    if not isinstance(value, dict):
        raise invalid_argument(f"{where}: an example must be a JSON object of features")
    features = {str(k): _feature(v, f"{where}['{k}']") for k, v in value.items()}
    return tf.train.Example(features=tf.train.Features(feature=features))


def example_input(document: dict) -> input_pb2.Input:
    """A classify/regress body (``examples`` and optional ``context``) -> ``Input``."""
    examples = document.get("examples")
    if not isinstance(examples, list) or not examples:
        raise invalid_argument("'examples' must be a non-empty list of objects")
    parsed = [_example(e, f"examples[{i}]") for i, e in enumerate(examples)]
    request_input = input_pb2.Input()
    if "context" in document:
        with_context = request_input.example_list_with_context
        with_context.context.CopyFrom(_example(document["context"], "context"))
        with_context.examples.extend(parsed)
    else:
        request_input.example_list.examples.extend(parsed)
    return request_input


def classify_response(response: classification_pb2.ClassificationResponse) -> dict:
    return {
        "results": [
            [[c.label, c.score] for c in classification.classes]
            for classification in response.result.classifications
        ]
    }


def regress_response(response: regression_pb2.RegressionResponse) -> dict:
    return {"results": [r.value for r in response.result.regressions]}
