"""Client for TF Serving's gRPC API: the same code talks to this package's server
and to ``tensorflow_model_server``.

    client = Client("127.0.0.1:8500", model_name="mmtf")
    outputs = client.predict(images=["a.png", None], texts=["a red bird", ""])
    outputs["class_name"], outputs["probabilities"]
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from multimodal_tf.compat import tf
from multimodal_tf.data import features
from multimodal_tf.serving import tensors
from multimodal_tf.signatures import DEFAULT_SIGNATURE

# Deadline of each RPC. 30 s covers one request of `max_batch` full-size inputs
# decoded in-graph on a small CPU server, including a version's first call,
# yet a hung or unreachable server still fails an interactive `mmtf predict`
# within half a minute instead of blocking forever (gRPC's default).
DEFAULT_TIMEOUT_SECONDS = 30.0
# Inputs per request: large enough to amortise the RPC, small enough that a
# request of full-size media stays far below gRPC's message limits.
DEFAULT_MAX_BATCH = 32
logger = logging.getLogger(__name__)


def _as_list(values: Any) -> list | None:
    if values is None:
        return None
    if isinstance(values, str | bytes | bytearray | os.PathLike):
        return [values]
    return list(values)


def _media_bytes(item: Any, what: str) -> bytes:
    """A file path or encoded bytes; None or "" = absent."""
    if item is None:
        return b""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str | os.PathLike):
        return Path(item).read_bytes() if str(item) else b""
    raise TypeError(f"{what}: expected a file path, bytes or None, got {type(item).__name__}")


def _text_bytes(item: Any) -> bytes:
    """Text as str (the text itself), bytes (UTF-8), a Path (a text file) or None."""
    if item is None:
        return b""
    if isinstance(item, os.PathLike):
        return Path(item).read_bytes().strip()
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    raise TypeError(f"texts: expected str, bytes, a Path or None, got {type(item).__name__}")


def raw_inputs(images=None, texts=None, audios=None) -> dict[str, list[bytes]]:
    """Per-modality lists of encoded bytes (b"" = absent); given lists must have equal lengths."""
    given = {
        features.IMAGE: _as_list(images),
        features.TEXT: _as_list(texts),
        features.AUDIO: _as_list(audios),
    }
    given = {name: values for name, values in given.items() if values is not None}
    if not given:
        raise ValueError("give at least one of images, texts, audios")
    lengths = {name: len(values) for name, values in given.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"images, texts and audios must have the same length, got {lengths}")
    raw = {}
    for name, values in given.items():
        if name == features.TEXT:
            raw[name] = [_text_bytes(v) for v in values]
        else:
            raw[name] = [_media_bytes(v, f"{name}s[{i}]") for i, v in enumerate(values)]
    return raw


def _concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {
        name: np.concatenate([p[name] for p in parts]) if parts[0][name].ndim else parts[0][name]
        for name in parts[0]
    }


class Predictor:
    """Raw media in, numpy outputs out; subclasses run one chunk of a batch."""

    model_name: str
    max_batch: int

    def predict(
        self,
        images: Sequence | None = None,
        texts: Sequence | None = None,
        audios: Sequence | None = None,
        *,
        version: int | None = None,
        version_label: str | None = None,
        signature_name: str = DEFAULT_SIGNATURE,
        output_filter: Iterable[str] = (),
    ) -> dict[str, np.ndarray]:
        """Runs ``signature_name`` on raw inputs: lists of file paths or bytes (None/"" = absent).

        Modalities the signature does not take are dropped (with a warning);
        those it takes but that are not given are sent as absent.
        """
        raw = raw_inputs(images, texts, audios)
        count = len(next(iter(raw.values())))
        wanted = self.signature_inputs(signature_name, version, version_label)
        if wanted is None:  # signature unknown here: let the server say what is wrong
            wanted = list(raw)
        other = sorted(set(wanted) - set(features.MODALITIES))
        if other:
            raise ValueError(
                f"signature {signature_name!r} takes {sorted(wanted)}, not raw media; call predict_tensors instead"
            )
        ignored = sorted(set(raw) - set(wanted))
        if ignored:
            logger.warning("signature %s does not take %s; ignoring those inputs", signature_name, ignored)
        inputs = {name: np.array(raw.get(name, [b""] * count), dtype=object) for name in wanted}
        return self.predict_tensors(
            inputs,
            version=version,
            version_label=version_label,
            signature_name=signature_name,
            output_filter=output_filter,
        )

    def predict_tensors(
        self,
        inputs: Mapping[str, Any],
        *,
        version: int | None = None,
        version_label: str | None = None,
        signature_name: str = DEFAULT_SIGNATURE,
        output_filter: Iterable[str] = (),
    ) -> dict[str, np.ndarray]:
        """Runs a signature on named tensors, ``max_batch`` rows per request; outputs concatenated."""
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        sizes = {name: (a.shape[0] if a.ndim else 1) for name, a in arrays.items()}
        total = max(sizes.values(), default=0)
        if len(set(sizes.values())) > 1 or any(a.ndim == 0 for a in arrays.values()):
            chunks = [arrays]  # not a common batch dimension: send as one request
        else:
            chunks = [
                {n: a[s : s + self.max_batch] for n, a in arrays.items()}
                for s in range(0, max(total, 1), self.max_batch)
            ]
        return _concatenate(
            self._run_chunks(chunks, version, version_label, signature_name, list(output_filter))
        )

    def signature_inputs(
        self, signature_name: str, version: int | None, version_label: str | None
    ) -> list[str] | None:
        raise NotImplementedError

    def _run_chunks(
        self, chunks, version, version_label, signature_name, output_filter
    ) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError


def _model_spec(spec: model_pb2.ModelSpec, name: str, version, version_label, signature_name: str) -> None:
    spec.name = name
    spec.signature_name = signature_name
    if version is not None and version_label:
        raise ValueError("give version or version_label, not both")
    if version is not None:
        spec.version.value = int(version)
    elif version_label:
        spec.version_label = version_label


def classification_requests(
    examples, context, model_name: str, version, version_label, signature_name: str, max_batch: int
) -> list[classification_pb2.ClassificationRequest]:
    """ClassificationRequests of at most ``max_batch`` examples (Examples or their bytes)."""
    parsed = [tf.train.Example.FromString(e) if isinstance(e, bytes) else e for e in examples]
    if not parsed:
        raise ValueError("classify needs at least one example")
    requests = []
    for start in range(0, len(parsed), max_batch):
        request = classification_pb2.ClassificationRequest()
        _model_spec(request.model_spec, model_name, version, version_label, signature_name)
        chunk = parsed[start : start + max_batch]
        if context is None:
            request.input.example_list.examples.extend(chunk)
        else:
            request.input.example_list_with_context.context.CopyFrom(context)
            request.input.example_list_with_context.examples.extend(chunk)
        requests.append(request)
    return requests


def classification_arrays(responses) -> dict[str, np.ndarray]:
    """ClassificationResponses -> ``{"classes": [N, K] str, "scores": [N, K] float32}``."""
    classes, scores = [], []
    for response in responses:
        for classification in response.result.classifications:
            classes.append([c.label for c in classification.classes])
            scores.append([c.score for c in classification.classes])
    return {"classes": np.array(classes, dtype=object), "scores": np.array(scores, dtype=np.float32)}


class Client(Predictor):
    """TF Serving gRPC client for one model.

    Args:
        target: ``host:port`` of the gRPC endpoint.
        model_name: the served model's name.
        timeout_seconds: deadline of each RPC (see DEFAULT_TIMEOUT_SECONDS).
        max_batch: inputs per Predict/Classify request; larger inputs are split.
        max_in_flight: requests of one call sent concurrently.
        max_message_bytes: gRPC send/receive limit of this channel.
        credentials: TLS credentials (see :func:`multimodal_tf.serving.tls.channel_credentials`);
            None connects in plain text.
    """

    def __init__(
        self,
        target: str,
        model_name: str = "mmtf",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = 2,
        max_message_bytes: int = 64 << 20,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be >= 1")
        self.target = target
        self.model_name = model_name
        self.timeout_seconds = timeout_seconds
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # gRPC's reconnect backoff grows to 120 s: a client started before
            # its server (or across a restart) could wait minutes after the
            # server is back. Retry at least every 2 s instead.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._signatures: dict[tuple, dict[str, meta_graph_pb2.SignatureDef]] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # === RPCs ===

    def metadata(
        self, *, version: int | None = None, version_label: str | None = None
    ) -> dict[str, meta_graph_pb2.SignatureDef]:
        """GetModelMetadata: the model's SignatureDefs by name."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        _model_spec(request.model_spec, self.model_name, version, version_label, "")
        response = self._predictions.GetModelMetadata(request, timeout=self.timeout_seconds)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return dict(signature_map.signature_def)

    def status(self, *, version: int | None = None, version_label: str | None = None) -> list[dict]:
        """GetModelStatus: one dict per version (version, state, error_code, error_message)."""
        request = get_model_status_pb2.GetModelStatusRequest()
        _model_spec(request.model_spec, self.model_name, version, version_label, "")
        response = self._models.GetModelStatus(request, timeout=self.timeout_seconds)
        state_names = get_model_status_pb2.ModelVersionStatus.State
        return [
            {
                "version": s.version,
                "state": state_names.Name(s.state),
                "error_code": _code_name(s.status.error_code),
                "error_message": s.status.error_message,
            }
            for s in response.model_version_status
        ]

    def wait_until_available(self, timeout_seconds: float = 60.0, poll_seconds: float = 0.2) -> list[dict]:
        """Polls GetModelStatus until a version is AVAILABLE; returns the statuses."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                statuses = self.status()
                if any(s["state"] == "AVAILABLE" for s in statuses):
                    return statuses
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"model {self.model_name} not available at {self.target} after {timeout_seconds} s"
                )
            time.sleep(poll_seconds)

    def classify(
        self,
        examples: Sequence[tf.train.Example | bytes],
        *,
        context: tf.train.Example | None = None,
        version: int | None = None,
        version_label: str | None = None,
        signature_name: str = "classify",
    ) -> dict[str, np.ndarray]:
        """Classify: ``{"classes": [N, K] str, "scores": [N, K] float32}``."""
        requests = classification_requests(
            examples, context, self.model_name, version, version_label, signature_name, self.max_batch
        )
        return classification_arrays(self._call_all(self._predictions.Classify, requests))

    # === Predictor ===

    def signature_inputs(self, signature_name, version, version_label) -> list[str] | None:
        key = (version, version_label)
        if key not in self._signatures:
            self._signatures[key] = self.metadata(version=version, version_label=version_label)
        signature = self._signatures[key].get(signature_name or DEFAULT_SIGNATURE)
        return None if signature is None else sorted(signature.inputs)

    def _run_chunks(self, chunks, version, version_label, signature_name, output_filter):
        requests = []
        for chunk in chunks:
            request = predict_pb2.PredictRequest(output_filter=output_filter)
            _model_spec(request.model_spec, self.model_name, version, version_label, signature_name)
            for name, value in chunk.items():
                request.inputs[name].CopyFrom(tensors.to_proto(value))
            requests.append(request)
        return [
            {name: tensors.from_proto(proto) for name, proto in response.outputs.items()}
            for response in self._call_all(self._predictions.Predict, requests)
        ]

    def _call_all(self, method, requests: list) -> list:
        """Sends ``requests`` with up to ``max_in_flight`` outstanding; responses in order."""
        if len(requests) == 1:  # the common case; a blocking call costs less than a future
            return [method(requests[0], timeout=self.timeout_seconds)]
        pending: collections.deque = collections.deque()
        responses = []
        for request in requests:
            if len(pending) >= self.max_in_flight:
                responses.append(pending.popleft().result())
            pending.append(method.future(request, timeout=self.timeout_seconds))
        responses.extend(future.result() for future in pending)
        return responses


def _code_name(number: int) -> str:
    """tensorflow.error.Code number -> name ("OK", "NOT_FOUND", ...)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return grpc.StatusCode.UNKNOWN.name
