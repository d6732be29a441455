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
from multimodal_tf.serving import inference, memory, tensors
from multimodal_tf.serving.batching import BatchScheduler
from multimodal_tf.serving.errors import Code, ServingError, invalid_argument
from multimodal_tf.serving.manager import ModelManager
from multimodal_tf.serving.metrics import Metrics
from multimodal_tf.serving.servable import DEFAULT_SIGNATURE, Servable

logger = logging.getLogger(__name__)


# Rows one request may have when neither a flag nor batching says otherwise:
# the demo model takes ~0.6 MB per row while it runs, so ~0.6 GB at most.
DEFAULT_MAX_ROWS = 1024
# After a run of at least this many rows the heap is trimmed (see memory.trim_heap).
TRIM_AFTER_ROWS = 64


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
        max_rows: most rows (batch dimension) one request may have; checked on
            the declared shape, before anything is expanded or allocated.
    """

    def __init__(
        self,
        manager: ModelManager,
        batcher: BatchScheduler | None = None,
        metrics: Metrics | None = None,
        max_elements: int = 1 << 26,
        request_timeout_seconds: float | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
    ):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.manager = manager
        self.max_rows = max_rows
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
            lambda s, run: inference.predict(s, request, run, self.max_elements, self.max_rows),
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

    def multi_inference(self, request, time_remaining: float | None = None, entrypoint: str = "GRPC"):
        if not request.tasks:  # checked before the model is looked up, as TF Serving does
            raise invalid_argument("Expected at least one task")
        return self.serve(
            "multi_inference",
            request.tasks[0].model_spec,
            time_remaining,
            entrypoint,
            lambda s, run: inference.multi_inference(s, request, run),
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
        # As TF Serving's get_model_status_impl.cc: version_label is ignored, and
        # an empty name is just a model that has no versions (NOT_FOUND).
        spec = request.model_spec
        version = spec.version.value if spec.WhichOneof("version_choice") == "version" else None
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in self.manager.status(spec.name, version):
            entry = response.model_version_status.add(version=status.version, state=status.state)
            entry.status.SetInParent()  # error_code OK is reported explicitly, as TF Serving does
            if status.error is not None:
                entry.status.error_code = status.error.code.value[0]
                entry.status.error_message = status.error.message
        return response

    def reload_config(self, request: model_management_pb2.ReloadConfigRequest):
        """Replaces the served models; an empty request changes nothing (as TF Serving)."""
        if request.config.WhichOneof("config") != "model_config_list":
            raise invalid_argument(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                "Only ModelConfigList is currently supported"
            )
        try:
            specs = config_lib.specs_from_proto(request.config, "ReloadConfigRequest")
        except config_lib.ServingConfigError as e:
            raise invalid_argument(str(e)) from None
        self.manager.set_config(specs)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = 0  # OK, set explicitly as TF Serving does
        response.status.SetInParent()
        return response

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
            tensors.check_rows(inputs, self.max_rows)
            if self.batcher is None:
                return self._execute(servable, signature, inputs)
            return self._run_batched(servable, signature, inputs, deadline)

        return run

    def _execute(self, servable: Servable, signature: str, inputs: Mapping[str, np.ndarray]):
        outputs = servable.run(signature, inputs)
        first = next(iter(inputs.values()), None)
        batch_size = first.shape[0] if first is not None and first.ndim else 1
        self.metrics.record_run(servable.name, servable.version, signature, batch_size)
        if batch_size >= TRIM_AFTER_ROWS:
            memory.trim_heap()
        return outputs

    def _run_batched(self, servable: Servable, signature: str, inputs: Mapping[str, np.ndarray], deadline):
        tensors.check_inputs(
            servable.signature(signature), inputs, servable.optional_inputs.get(signature, ())
        )
        sizes = {value.shape[0] if value.ndim else None for value in inputs.values()}
        size = sizes.pop() if len(sizes) == 1 else None
        if not size:  # unbatchable (scalars, unequal or empty batches): runs alone
            return self._execute(servable, signature, inputs)
        options = self.batcher.options
        if size > options.max_batch_size:
            raise invalid_argument(
                f"Task size {size} is larger than maximum input batch size {options.max_batch_size}"
            )
        queue = (servable.name, servable.version, signature)
        key = tuple(sorted((name, value.dtype.str, value.shape[1:]) for name, value in inputs.items()))
        # Large batch splitting: pieces of at most execution_batch_size rows.
        step = options.execution_batch_size
        futures = [
            self.batcher.submit(
                queue,
                key,
                lambda merged: self._execute(servable, signature, merged),
                {name: value[start : start + step] for name, value in inputs.items()},
                min(step, size - start),
            )
            for start in range(0, size, step)
        ]
        try:
            pieces = [
                future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
                for future in futures
            ]
        except TimeoutError:
            for future in futures:
                future.cancel()
            raise ServingError(
                Code.DEADLINE_EXCEEDED, "deadline exceeded while waiting for a batch"
            ) from None
        if len(pieces) == 1:
            return pieces[0]
        return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}
