"""The model server: TF Serving's gRPC services and REST API over one InferenceService.

The gRPC servicers delegate each RPC to :class:`InferenceService` (a plain
Python object) and only translate its :class:`ServingError` into a status.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import NoReturn

import grpc
from google.protobuf import message
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from multimodal_tf.serving import config as config_lib
from multimodal_tf.serving.batching import BatchScheduler
from multimodal_tf.serving.config import BatchingOptions, ModelSpec
from multimodal_tf.serving.errors import Code, ServingError
from multimodal_tf.serving.manager import ModelManager
from multimodal_tf.serving.metrics import Metrics
from multimodal_tf.serving.rest import RestServer
from multimodal_tf.serving.service import DEFAULT_MAX_ROWS, InferenceService
from multimodal_tf.serving.tls import TLSOptions

logger = logging.getLogger(__name__)


def _answer(context: grpc.ServicerContext, method, request):
    try:
        return method(request, context.time_remaining())
    except ServingError as e:
        context.abort(e.code, e.message)
    except Exception as e:  # noqa: BLE001 - every RPC ends with a status
        logger.exception("RPC failed")
        context.abort(Code.INTERNAL, f"{type(e).__name__}: {e}")


def exit_process(code: int) -> NoReturn:
    """Ends the process now, after flushing logs and stdout/stderr, skipping interpreter teardown.

    After a graceful stop nothing is left to clean up, but a normal exit then
    spends 3-8 s garbage-collecting TF's objects (measured: "server stopped" at
    +2 s of --grace-seconds 2, process gone at +6 to +10 s), which would blow
    the orchestrator's termination grace period and get the pod SIGKILLed.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to say
            pass
    os._exit(code)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService`` over an InferenceService."""

    def __init__(self, service: InferenceService):
        self.service = service

    def Predict(self, request, context):  # noqa: N802 - gRPC method names
        return _answer(context, self.service.predict, request)

    def Classify(self, request, context):  # noqa: N802
        return _answer(context, self.service.classify, request)

    def Regress(self, request, context):  # noqa: N802
        return _answer(context, self.service.regress, request)

    def GetModelMetadata(self, request, context):  # noqa: N802
        return _answer(context, self.service.get_model_metadata, request)

    def MultiInference(self, request, context):  # noqa: N802
        return _answer(context, self.service.multi_inference, request)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService`` (status and config reload)."""

    def __init__(self, service: InferenceService):
        self.service = service

    def GetModelStatus(self, request, context):  # noqa: N802
        return _answer(context, lambda r, _: self.service.get_model_status(r), request)

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        return _answer(context, lambda r, _: self.service.reload_config(r), request)


def _parsing_handler(method, request_class):
    """Parses the request itself, so undecodable bytes answer INVALID_ARGUMENT.

    With the generated ``add_*_to_server`` gRPC parses the message, and a
    malformed one fails as INTERNAL ("Exception deserializing request").
    """

    def handle(data: bytes, context: grpc.ServicerContext):
        try:
            request = request_class.FromString(data)
        except message.DecodeError as e:
            context.abort(Code.INVALID_ARGUMENT, f"malformed {request_class.DESCRIPTOR.name}: {e}")
        return method(request, context)

    return handle


# (request, response) of each RPC, as in prediction_service.proto / model_service.proto.
# (Their *_pb2 modules do not import under protobuf 4's upb backend; the
# message modules do.)
PREDICTION_SERVICE = (
    "tensorflow.serving.PredictionService",
    {
        "Classify": (classification_pb2.ClassificationRequest, classification_pb2.ClassificationResponse),
        "Regress": (regression_pb2.RegressionRequest, regression_pb2.RegressionResponse),
        "Predict": (predict_pb2.PredictRequest, predict_pb2.PredictResponse),
        "MultiInference": (inference_pb2.MultiInferenceRequest, inference_pb2.MultiInferenceResponse),
        "GetModelMetadata": (
            get_model_metadata_pb2.GetModelMetadataRequest,
            get_model_metadata_pb2.GetModelMetadataResponse,
        ),
    },
)
MODEL_SERVICE = (
    "tensorflow.serving.ModelService",
    {
        "GetModelStatus": (
            get_model_status_pb2.GetModelStatusRequest,
            get_model_status_pb2.GetModelStatusResponse,
        ),
        "HandleReloadConfigRequest": (
            model_management_pb2.ReloadConfigRequest,
            model_management_pb2.ReloadConfigResponse,
        ),
    },
)


def add_servicer(server: grpc.Server, servicer, service: tuple[str, dict]) -> None:
    """Registers ``servicer``'s methods for ``service`` (PREDICTION_SERVICE or MODEL_SERVICE)."""
    name, methods = service
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            _parsing_handler(getattr(servicer, method), request_class),
            response_serializer=response_class.SerializeToString,
        )
        for method, (request_class, response_class) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


class ModelServer:
    """An in-process TF Serving-compatible server (gRPC + REST).

    Args:
        models: model specs to serve (see :func:`config.single_model`), or
        model_config_file: a TF Serving ``--model_config_file``.
        host: address to bind; 127.0.0.1 unless exposing the server is intended.
        port: gRPC port (0 picks a free one; see ``.port``).
        rest_api_port: REST port (0 picks a free one; None disables REST).
        file_system_poll_wait_seconds: how often base paths are polled (0: once).
        model_config_file_poll_wait_seconds: how often the config file is re-read (0: never).
        batching: server-side batching options; None disables batching.
        metrics_path: REST path of the Prometheus metrics; None disables them.
        grpc_max_message_bytes: largest gRPC message received or sent (and REST body).
        request_timeout_seconds: server-side deadline per request (None: only the client's).
        max_workers: threads answering RPCs (with batching, waiting requests hold one each).
        warmup: replay each version's warmup requests before serving it.
        max_request_rows: most rows one request may have (None: the batching
            max_batch_size, else service.DEFAULT_MAX_ROWS).
        max_num_load_retries: retries of a failed version load (TF Serving's default 5).
        load_retry_interval_seconds: wait between load retries (TF Serving's default 60 s).
        rest_workers: threads serving REST connections.
        tls: TLS for both ports (TF Serving's ``--ssl_config_file``, see
            :mod:`~multimodal_tf.serving.tls`); None serves plain text.
    """

    # Over 60 lines: one keyword argument per TF Serving flag, and its docstring.
    def __init__(
        self,
        models: Sequence[ModelSpec] | None = None,
        *,
        model_config_file: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 8500,
        rest_api_port: int | None = 8501,
        file_system_poll_wait_seconds: float = 1.0,
        model_config_file_poll_wait_seconds: float = 0.0,
        batching: BatchingOptions | None = None,
        metrics_path: str | None = None,
        grpc_max_message_bytes: int = 64 << 20,
        request_timeout_seconds: float | None = None,
        max_workers: int = 64,
        warmup: bool = True,
        max_request_rows: int | None = None,
        max_num_load_retries: int = 5,
        load_retry_interval_seconds: float = 60.0,
        rest_workers: int = 32,
        tls: TLSOptions | None = None,
    ):
        if (models is None) == (model_config_file is None):
            raise config_lib.ServingConfigError("give exactly one of models or model_config_file")
        self.model_config_file = model_config_file
        self._config_text = None
        if model_config_file is not None:
            try:
                self._config_text = Path(model_config_file).read_text(encoding="utf-8")
            except OSError as e:
                raise config_lib.ServingConfigError(
                    f"cannot read model config file {model_config_file}: {e}"
                ) from None
            specs = config_lib.parse_model_config(self._config_text, str(model_config_file))
        else:
            specs = list(models)
        self.host = host
        self._requested_ports = (port, rest_api_port)
        self.config_poll_seconds = model_config_file_poll_wait_seconds
        self.grpc_max_message_bytes = grpc_max_message_bytes
        self.max_workers = max_workers
        self.metrics_path = metrics_path
        self.metrics = Metrics()
        self.rest_workers = rest_workers
        self.tls = tls
        self.manager = ModelManager(
            specs,
            file_system_poll_wait_seconds,
            warmup=warmup,
            max_num_load_retries=max_num_load_retries,
            load_retry_interval_seconds=load_retry_interval_seconds,
        )
        if max_request_rows is None:
            max_request_rows = batching.max_batch_size if batching is not None else DEFAULT_MAX_ROWS
        self.batcher = BatchScheduler(batching) if batching is not None else None
        self.service = InferenceService(
            self.manager,
            self.batcher,
            self.metrics,
            max_elements=max(1 << 20, grpc_max_message_bytes),
            request_timeout_seconds=request_timeout_seconds,
            max_rows=max_request_rows,
        )
        self._grpc: grpc.Server | None = None
        self._rest: RestServer | None = None
        self.port: int | None = None
        self._stopped = threading.Event()
        self._config_thread: threading.Thread | None = None

    # === Lifecycle ===

    def start(self) -> ModelServer:
        """Loads the models (returns once the initial versions are loaded) and starts listening."""
        try:
            self.manager.start()
            self._start_grpc()
            port, rest_port = self._requested_ports
            if rest_port is not None:
                self._rest = RestServer(
                    self.service,
                    self.host,
                    rest_port,
                    self.metrics,
                    self.metrics_path,
                    self.grpc_max_message_bytes,
                    num_workers=self.rest_workers,
                    ssl_context=self.tls.ssl_context() if self.tls else None,
                )
                self._rest.start()
        except BaseException:
            self.stop(0)
            raise
        if self.model_config_file and self.config_poll_seconds > 0:
            self._config_thread = threading.Thread(
                target=self._poll_config, name="config-poller", daemon=True
            )
            self._config_thread.start()
        logger.info("serving gRPC on %s, REST on %s", self.grpc_target, self.rest_url or "(off)")
        return self

    def _start_grpc(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.grpc_max_message_bytes),
            ("grpc.max_send_message_length", self.grpc_max_message_bytes),
            # gRPC lets a second server bind a busy port by default; fail instead.
            ("grpc.so_reuseport", 0),
        ]
        self._executor = futures.ThreadPoolExecutor(self.max_workers, "grpc")
        self._grpc = grpc.server(self._executor, options=options)
        add_servicer(self._grpc, PredictionServicer(self.service), PREDICTION_SERVICE)
        add_servicer(self._grpc, ModelServicer(self.service), MODEL_SERVICE)
        address = f"{self.host}:{self._requested_ports[0]}"
        try:
            if self.tls is not None:
                self.port = self._grpc.add_secure_port(address, self.tls.grpc_credentials())
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as e:  # newer grpcio raises instead of returning 0
            raise OSError(f"cannot bind gRPC to {address}: {e}") from None
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address} (in use?)")
        self._grpc.start()

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stops accepting requests, lets in-flight ones finish (up to ``grace_seconds``), unloads."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        deadline = time.monotonic() + grace_seconds
        grpc_done = self._grpc.stop(grace_seconds) if self._grpc else None
        if self._rest is not None:
            self._rest.stop(max(0.0, deadline - time.monotonic()))
        if grpc_done is not None:
            grpc_done.wait(max(0.0, deadline - time.monotonic()))
            self._executor.shutdown(wait=False)
        if self.batcher is not None:
            self.batcher.stop(max(0.0, deadline - time.monotonic()))
        self.manager.stop(max(0.0, deadline - time.monotonic()))
        logger.info("server stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until :meth:`stop` is called; returns whether it was."""
        return self._stopped.wait(timeout)

    def serve_until_signal(
        self, grace_seconds: float = 10.0, signals=(signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Runs until SIGTERM/SIGINT, then stops gracefully (call from the main thread)."""
        received = threading.Event()
        previous = {s: signal.signal(s, lambda number, frame: received.set()) for s in signals}
        try:
            while not received.wait(0.5) and not self._stopped.is_set():
                pass
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        logger.info("signal received: stopping within %.0f s", grace_seconds)
        self.stop(grace_seconds)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _poll_config(self) -> None:
        while not self._stopped.wait(self.config_poll_seconds):
            try:
                text = Path(self.model_config_file).read_text(encoding="utf-8")
                if text != self._config_text:
                    self._config_text = text
                    self.manager.set_config(config_lib.parse_model_config(text, str(self.model_config_file)))
                    logger.info("reloaded model config %s", self.model_config_file)
            except (OSError, config_lib.ServingConfigError) as e:
                logger.error("model config reload failed (keeping the current one): %s", e)

    # === Addresses ===

    @property
    def rest_api_port(self) -> int | None:
        return self._rest.port if self._rest is not None else None

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def rest_url(self) -> str | None:
        if self._rest is None:
            return None
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.rest_api_port}"
