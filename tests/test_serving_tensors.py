"""TensorProto <-> numpy <-> tensor conversions on the server's request path."""

from __future__ import annotations

import numpy as np
import pytest
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from multimodal_tf.compat import tf
from multimodal_tf.serving import tensors
from multimodal_tf.serving.errors import Code, ServingError

# Binary payloads as a request carries them: NUL bytes (a WAV ending in
# silence), bytes that are not UTF-8, and an empty string (absent modality).
BINARY = [b"RIFF\x00\x01\x00\x00", b"\xff\xd8\xff\xe0\x00\x00", b"", b"plain text \xc3\xa9"]


@pytest.mark.parametrize(
    "value",
    [
        np.array(BINARY, dtype=object),
        np.array(BINARY, dtype=object).reshape(2, 2),
        np.array([], dtype=object),
        np.array(["unicode é", "x"], dtype=object),
    ],
    ids=["1d-binary", "2d", "empty", "str"],
)
def test_to_tensor_strings_match_tf_conversion(value):
    tensor = tensors.to_tensor(value, tf.string)
    expected = tf.convert_to_tensor(value, dtype=tf.string)
    assert tensor.dtype == tf.string
    assert tensor.shape == expected.shape == value.shape
    np.testing.assert_array_equal(tensor.numpy(), expected.numpy())


def test_to_tensor_numbers_keep_dtype_and_values():
    value = np.arange(6, dtype=np.int64).reshape(2, 3)
    tensor = tensors.to_tensor(value, tf.int64)
    assert tensor.dtype == tf.int64
    np.testing.assert_array_equal(tensor.numpy(), value)


def test_proto_round_trip_keeps_binary_strings_exactly():
    value = np.array(BINARY, dtype=object)
    back = tensors.to_ndarray(tensors.to_proto(value), "audio", max_elements=10)
    assert back.shape == (4,)
    assert list(back) == BINARY  # trailing NULs and non-UTF-8 bytes survive


def test_declared_shape_beyond_limit_names_input_without_allocating():
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=1 << 40) for _ in range(3))
    with pytest.raises(ServingError) as raised:
        tensors.to_ndarray(proto, "image", max_elements=1 << 26)
    assert raised.value.code == Code.INVALID_ARGUMENT
    assert "input 'image'" in str(raised.value) and str(1 << 120) in str(raised.value)
