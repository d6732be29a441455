"""TensorProto <-> numpy, and checking request tensors against a SignatureDef.

Every check raises INVALID_ARGUMENT naming the input and what is wrong, so a
client mistake never reaches the graph as a Python TypeError (which would
surface as UNKNOWN/INTERNAL).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import input_pb2

from multimodal_tf.compat import tf
from multimodal_tf.serving.errors import invalid_argument

# Dtypes a request may carry; resource/variant handles are never client data.
_REQUEST_DTYPES = {
    types_pb2.DT_FLOAT,
    types_pb2.DT_DOUBLE,
    types_pb2.DT_HALF,
    types_pb2.DT_BFLOAT16,
    types_pb2.DT_INT8,
    types_pb2.DT_INT16,
    types_pb2.DT_INT32,
    types_pb2.DT_INT64,
    types_pb2.DT_UINT8,
    types_pb2.DT_UINT16,
    types_pb2.DT_UINT32,
    types_pb2.DT_UINT64,
    types_pb2.DT_BOOL,
    types_pb2.DT_STRING,
    types_pb2.DT_COMPLEX64,
    types_pb2.DT_COMPLEX128,
}


def dtype_name(dtype_enum: int) -> str:
    try:
        return tf.dtypes.as_dtype(dtype_enum).name
    except TypeError:
        return f"<dtype {dtype_enum}>"


def shape_of(tensor_info: meta_graph_pb2.TensorInfo) -> list[int] | None:
    """Signature shape, -1 for unknown dims; None when the rank is unknown."""
    shape = tensor_info.tensor_shape
    return None if shape.unknown_rank else [d.size for d in shape.dim]


def to_ndarray(
    proto: tensor_pb2.TensorProto, name: str, max_elements: int, max_rows: int | None = None
) -> np.ndarray:
    """Request TensorProto -> numpy, refusing malformed or oversized tensors.

    ``max_elements`` and ``max_rows`` bound the declared shape: TF expands a
    short value list to the declared shape, so a 73-byte message with one
    string and shape [8000] would otherwise become 8,000 rows to decode.
    """
    if proto.dtype not in _REQUEST_DTYPES:
        raise invalid_argument(f"input '{name}': dtype {dtype_name(proto.dtype)} is not allowed in a request")
    if proto.tensor_shape.unknown_rank:
        raise invalid_argument(f"input '{name}': tensor_shape must have a known rank")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise invalid_argument(f"input '{name}': negative dimension in shape {dims}")
    if max_rows is not None and dims and dims[0] > max_rows:
        raise invalid_argument(_rows_message(name, dims[0], max_rows))
    num_elements = math.prod(dims)  # Python ints: exact, no overflow (np.prod is also ~10x slower)
    if num_elements > max_elements:
        raise invalid_argument(
            f"input '{name}': shape {dims} has {num_elements} elements; the limit is {max_elements}"
        )
    try:
        return from_proto(proto)
    except (ValueError, TypeError, IndexError, OverflowError) as e:
        raise invalid_argument(f"input '{name}': malformed TensorProto ({e})") from None


def _rows_message(name: str, rows: int, max_rows: int) -> str:
    return (
        f"input '{name}' has {rows} rows; the limit per request is {max_rows} "
        "(split the request, or raise --max-request-rows)"
    )


def check_rows(inputs: Mapping[str, np.ndarray], max_rows: int) -> None:
    """Every input's batch dimension must be at most ``max_rows``."""
    for name, value in inputs.items():
        if value.ndim and value.shape[0] > max_rows:
            raise invalid_argument(_rows_message(name, value.shape[0], max_rows))


@functools.cache
def _numpy_dtype(dtype_enum: int) -> np.dtype:
    return np.dtype(tf.dtypes.as_dtype(dtype_enum).as_numpy_dtype)


def from_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """TensorProto -> numpy; strings and ``tensor_content`` without tf.make_ndarray's overhead."""
    dims = [d.size for d in proto.tensor_shape.dim]
    count = math.prod(dims)
    if proto.dtype == types_pb2.DT_STRING and len(proto.string_val) == count:
        array = np.empty(count, dtype=object)
        array[:] = list(proto.string_val)
        return array.reshape(dims)
    if proto.tensor_content and proto.dtype != types_pb2.DT_STRING:
        dtype = _numpy_dtype(proto.dtype)
        if len(proto.tensor_content) != count * dtype.itemsize:
            raise ValueError(
                f"tensor_content has {len(proto.tensor_content)} bytes; shape {dims} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(proto.tensor_content, dtype).reshape(dims)
    return tf.make_ndarray(proto)


def to_tensor(value: np.ndarray, dtype: tf.DType) -> tf.Tensor:
    """numpy -> eager tensor of ``dtype``; strings through a list (about half the cost of an object array)."""
    if dtype == tf.string and value.dtype == object and value.ndim == 1 and value.size:
        return tf.constant(value.tolist(), dtype=tf.string)
    return tf.convert_to_tensor(value, dtype=dtype)


# numpy kind/size -> the TensorProto field TF Serving fills (Tensor::AsProtoField).
_VALUE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_COMPLEX64: "scomplex_val",
    types_pb2.DT_COMPLEX128: "dcomplex_val",
}


def to_proto(value) -> tensor_pb2.TensorProto:
    """numpy (or nested lists) -> TensorProto, with values in the typed fields as TF Serving writes them.

    Strings go to ``string_val``, float32 to ``float_val``, int64 to
    ``int64_val`` and so on (never ``tensor_content``), so clients that read
    ``float_val`` directly work against this server as against TF Serving.
    """
    array = np.asarray(value)
    if array.dtype == object and all(isinstance(v, bytes) for v in array.flat):
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=list(array.flat))
    elif array.dtype.kind in "biufc" or array.dtype.name == "bfloat16":
        dtype = tf.dtypes.as_dtype(array.dtype).as_datatype_enum
        proto = tensor_pb2.TensorProto(dtype=dtype)
        flat = array.reshape(-1)
        if dtype in (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):  # bit patterns in half_val
            proto.half_val.extend(flat.view(np.uint16).tolist())
        elif array.dtype.kind == "c":  # (real, imaginary) pairs
            getattr(proto, _VALUE_FIELDS[dtype]).extend(flat.view(flat.real.dtype).tolist())
        else:
            getattr(proto, _VALUE_FIELDS[dtype]).extend(flat.tolist())
    else:  # str, mixed objects: TF's general conversion
        return tf.make_tensor_proto(array)
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape)
    return proto


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_inputs(
    signature: meta_graph_pb2.SignatureDef, inputs: Mapping[str, np.ndarray], optional: Collection[str] = ()
) -> None:
    """Input names, dtypes and shapes must match the signature (as TF Serving requires).

    ``optional`` inputs may be left out (an approximate ``search``'s ``k``;
    graph signatures have none).
    """
    expected = set(signature.inputs)
    sent = set(inputs) | (set(optional) & expected)
    for name in sorted(sent - expected):
        raise invalid_argument(
            f"input tensor alias not found in signature: {name}. "
            f"Inputs expected to be in the set {{{','.join(sorted(expected))}}}."
        )
    missing = sorted(expected - sent)
    if missing:
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Missing but required: {{{','.join(missing)}}}."
        )
    for name, value in inputs.items():
        info = signature.inputs[name]
        want = tf.dtypes.as_dtype(info.dtype)
        got = tf.dtypes.as_dtype(value.dtype) if value.dtype != object else tf.string
        if got != want:
            raise invalid_argument(f"input '{name}': expected dtype {want.name}, got {got.name}")
        shape = shape_of(info)
        if shape is None:
            continue
        if len(shape) != value.ndim or any(
            s not in (-1, v) for s, v in zip(shape, value.shape, strict=False)
        ):
            raise invalid_argument(
                f"input '{name}': expected shape {_shape_text(shape)} (-1 = any), got {_shape_text(value.shape)}"
            )


def check_output_filter(signature: meta_graph_pb2.SignatureDef, output_filter) -> list[str]:
    names = list(output_filter) or sorted(signature.outputs)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:  # as predict_util.cc
        raise invalid_argument(f"duplicate output tensor alias found in output_filter: {duplicates[0]}")
    for name in names:
        if name not in signature.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {name} Outputs expected to be in the set "
                f"{{{','.join(sorted(signature.outputs))}}}."
            )
    return names


def serialized_examples(request_input: input_pb2.Input) -> np.ndarray:
    """Classify/Regress ``Input`` -> [N] serialized ``tf.Example`` strings.

    With a context, each example is the context's bytes followed by the
    example's: parsing the concatenation merges them with the example's
    features winning, exactly as TF Serving feeds them.
    """
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = [e.SerializeToString() for e in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        with_context = request_input.example_list_with_context
        context = with_context.context.SerializeToString()
        examples = [context + e.SerializeToString() for e in with_context.examples]
    else:
        raise invalid_argument("Input is empty: set example_list or example_list_with_context")
    if not examples:
        raise invalid_argument("Input is empty: it holds no examples")
    return np.array(examples, dtype=object)
