"""The serving logic behind both front ends: a plain Python object, protos in and out.

gRPC servicers and the REST handler only translate transport details;
every RPC comes here, runs under one try/except that maps any exception to a
status, and is counted in the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import numpy as np
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
)

from multimodal_tf.serving import config as config_lib
from multimodal_tf.serving import inference, tensors
from multimodal_tf.serving.batching import BatchScheduler
from multimodal_tf.serving.errors import Code, ServingError, invalid_argument
from multimodal_tf.serving.manager import ModelManager
from multimodal_tf.serving.metrics import Metrics
from multimodal_tf.serving.servable import DEFAULT_SIGNATURE, Servable

logger = logging.getLogger(__name__)


def _spec_choice(spec: model_pb2.ModelSpec) -> tuple[str, int | None, str | None]:
    if not spec.name:
        raise invalid_argument("model_spec.name is empty: name the model to call")
    choice = spec.WhichOneof("version_choice")
    version = spec.version.value if choice == "version" else None
    label = spec.version_label if choice == "version_label" else None
    return spec.name, version, label


class InferenceService:
    """Resolves the model version, runs the request (batched or not), records metrics.

    Args:
        manager: the loaded models.
        batcher: merges requests when server-side batching is on.
        metrics: where request counts and latencies go.
        max_elements: largest tensor a request may declare (elements).
        request_timeout_seconds: server-side deadline for one request; a
            client's own gRPC deadline applies when shorter.
    """

    def __init__(
        self,
        manager: ModelManager,
        batcher: BatchScheduler | None = None,
        metrics: Metrics | None = None,
        max_elements: int = 1 << 26,
        request_timeout_seconds: float | None = None,
    ):
        self.manager = manager
        self.batcher = batcher
        self.metrics = metrics or Metrics()
        self.max_elements = max_elements
        self.request_timeout_seconds = request_timeout_seconds

    # === RPCs ===

    def predict(self, request, time_remaining: float | None = None, entrypoint: str = "GRPC"):
        return self.serve(
            "predict",
            request.model_spec,
            time_remaining,
            entrypoint,
            lambda s, run: inference.predict(s, request, run, self.max_elements),
        )

    def classify(self, request, time_remaining: float | None = None, entrypoint: str = "GRPC"):
        return self.serve(
            "classify",
            request.model_spec,
            time_remaining,
            entrypoint,
            lambda s, run: inference.classify(s, request, run),
        )

    def regress(self, request, time_remaining: float | None = None, entrypoint: str = "GRPC"):
        return self.serve(
            "regress",
            request.model_spec,
            time_remaining,
            entrypoint,
            lambda s, run: inference.regress(s, request, run),
        )

    def get_model_metadata(self, request, time_remaining: float | None = None, entrypoint: str = "GRPC"):
        return self.serve(
            "metadata",
            request.model_spec,
            time_remaining,
            entrypoint,
            lambda s, run: inference.metadata(s, request),
        )

    def get_model_status(self, request: get_model_status_pb2.GetModelStatusRequest):
        name, version, label = _spec_choice(request.model_spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in self.manager.status(name, version, label):
            entry = response.model_version_status.add(version=status.version, state=status.state)
            entry.status.SetInParent()  # error_code OK is reported explicitly, as TF Serving does
            if status.error is not None:
                entry.status.error_code = status.error.code.value[0]
                entry.status.error_message = status.error.message
        return response

    def reload_config(self, request: model_management_pb2.ReloadConfigRequest):
        try:
            specs = config_lib.specs_from_proto(request.config, "ReloadConfigRequest")
        except config_lib.ServingConfigError as e:
            raise invalid_argument(str(e)) from None
        self.manager.set_config(specs)
        return model_management_pb2.ReloadConfigResponse()

    # === Shared path ===

    def serve(
        self,
        api: str,
        model_spec: model_pb2.ModelSpec,
        time_remaining: float | None,
        entrypoint: str,
        handle: Callable[[Servable, inference.Runner], object],
    ):
        """Runs ``handle(servable, run)`` on the version ``model_spec`` names, holding it meanwhile.

        Maps every failure to a ServingError and records the request's metrics.
        """
        start = time.monotonic()
        deadline = self._deadline(start, time_remaining)
        status, version, name = "OK", None, model_spec.name
        signature = model_spec.signature_name or ("" if api == "metadata" else DEFAULT_SIGNATURE)
        try:
            name, version_choice, label = _spec_choice(model_spec)
            with self.manager.servable(name, version_choice, label) as servable:
                version = servable.version
                return handle(servable, self._runner(deadline))
        except ServingError as e:
            status = e.code.name
            raise
        except Exception as e:  # noqa: BLE001 - a bug must answer INTERNAL, never kill the RPC thread
            status = Code.INTERNAL.name
            logger.exception("%s on model %s failed", api, name)
            raise ServingError(Code.INTERNAL, f"{type(e).__name__}: {e}") from None
        finally:
            self.metrics.record_request(
                name, version, signature, api, entrypoint, status, time.monotonic() - start
            )

    def _deadline(self, start: float, time_remaining: float | None) -> float | None:
        limits = [t for t in (time_remaining, self.request_timeout_seconds) if t is not None]
        return start + min(limits) if limits else None

    def _runner(self, deadline: float | None) -> inference.Runner:
        def run(servable: Servable, signature: str, inputs: Mapping[str, np.ndarray]):
            if deadline is not None and time.monotonic() >= deadline:
                raise ServingError(Code.DEADLINE_EXCEEDED, "deadline exceeded before the model ran")
            if self.batcher is None:
                return self._execute(servable, signature, inputs)
            return self._run_batched(servable, signature, inputs, deadline)

        return run

    def _execute(self, servable: Servable, signature: str, inputs: Mapping[str, np.ndarray]):
        outputs = servable.run(signature, inputs)
        first = next(iter(inputs.values()), None)
        batch_size = first.shape[0] if first is not None and first.ndim else 1
        self.metrics.record_run(servable.name, servable.version, signature, batch_size)
        return outputs

    def _run_batched(self, servable: Servable, signature: str, inputs: Mapping[str, np.ndarray], deadline):
        tensors.check_inputs(servable.signature(signature), inputs)
        sizes = {value.shape[0] if value.ndim else None for value in inputs.values()}
        size = sizes.pop() if len(sizes) == 1 else None
        if not size or size > self.batcher.options.max_batch_size:
            # Unbatchable (scalars, unequal or empty batches) or too big: runs alone.
            return self._execute(servable, signature, inputs)
        queue = (servable.name, servable.version, signature)
        key = tuple(sorted((name, value.dtype.str, value.shape[1:]) for name, value in inputs.items()))
        future = self.batcher.submit(
            queue, key, lambda merged: self._execute(servable, signature, merged), inputs, size
        )
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise ServingError(
                Code.DEADLINE_EXCEEDED, "deadline exceeded while waiting for a batch"
            ) from None
