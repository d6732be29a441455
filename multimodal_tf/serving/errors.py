"""Errors with TF Serving's status codes, shared by the gRPC and REST front ends."""

from __future__ import annotations

import re

import grpc

from multimodal_tf.compat import tf

Code = grpc.StatusCode

# TF Serving's mapping of canonical codes to HTTP statuses (http_rest_api_handler).
HTTP_STATUS = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}

_CODE_BY_NUMBER = {code.value[0]: code for code in Code}

# Lines TF adds around a graph error that say nothing about the request.
_NOISE_PREFIXES = ("Graph execution error", "Detected at node", "<stack traces unavailable>")
# The eager call's own tag, e.g. " [Op:__inference_signature_wrapper_10016]".
_EAGER_OP_TAG = re.compile(r"\s*\[Op:__inference_\w+\]\s*$")


class ServingError(Exception):
    """A request failed with a canonical status ``code`` and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def invalid_argument(message: str) -> ServingError:
    return ServingError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(Code.NOT_FOUND, message)


def code_from_number(number: int) -> grpc.StatusCode:
    """tensorflow.error.Code number -> grpc.StatusCode (the numbers are the same)."""
    return _CODE_BY_NUMBER.get(number, Code.UNKNOWN)


def graph_error_message(error: tf.errors.OpError) -> str:
    """The part of a TF runtime error that describes the problem.

    Eager signature calls wrap the graph's message in lines naming where the
    function was traced; TF Serving passes only the op's message through.
    """
    lines = [line for line in error.message.splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(_NOISE_PREFIXES)]
    return _EAGER_OP_TAG.sub("", "\n".join(kept)) or error.message


def from_tf_error(error: tf.errors.OpError) -> ServingError:
    """A TF runtime error with the same canonical code (InvalidArgumentError -> INVALID_ARGUMENT)."""
    return ServingError(code_from_number(error.error_code), graph_error_message(error))
