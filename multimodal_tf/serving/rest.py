"""TF Serving's REST API (``/v1/models/...``) and the Prometheus endpoint.

Routes, as in TF Serving::

    GET  /v1/models/NAME[/versions/N | /labels/L]            model status
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata   signature defs
    POST /v1/models/NAME[/versions/N | /labels/L]:predict    {"instances"|"inputs": ...}
    POST /v1/models/NAME[/versions/N | /labels/L]:classify   {"examples": [...], "context": {...}}
    POST /v1/models/NAME[/versions/N | /labels/L]:regress
    GET  <metrics path>                                      Prometheus text

Errors are ``{"error": "..."}`` with TF Serving's HTTP status for the code.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    regression_pb2,
)

from multimodal_tf.serving import inference, rest_json
from multimodal_tf.serving.errors import Code, ServingError, invalid_argument, not_found
from multimodal_tf.serving.metrics import Metrics
from multimodal_tf.serving.service import InferenceService

logger = logging.getLogger(__name__)

_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?::(?P<verb>predict|classify|regress)|(?P<metadata>/metadata))?/?$"
)
# Idle keep-alive connections and slow senders are dropped after this many
# seconds, so they cannot hold handler threads forever.
SOCKET_TIMEOUT_SECONDS = 60


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_SECONDS
    server: _HTTPServer

    def setup(self):
        super().setup()
        # Headers and body are separate writes; without this, Nagle's algorithm
        # and the client's delayed ACK add ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self):  # noqa: N802 - http.server's names
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        if not owner.begin_request():
            self._send(503, {"error": "server is shutting down"}, close=True)
            return
        try:
            path = urllib.parse.urlsplit(self.path).path
            if method == "GET" and owner.metrics_path and path == owner.metrics_path:
                self._send_text(200, owner.metrics.render())
                return
            body = self._read_body(owner.max_body_bytes) if method == "POST" else b""
            status, payload = owner.handle(method, path, body)
            self._send(status, payload)
        except ServingError as e:
            self._send(e.http_status, {"error": e.message}, close=e.code == Code.RESOURCE_EXHAUSTED)
        except Exception as e:  # noqa: BLE001 - answer, never drop the connection silently
            logger.exception("REST request failed")
            self._send(500, {"error": f"{type(e).__name__}: {e}"})
        finally:
            owner.end_request()

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ServingError(
                Code.INVALID_ARGUMENT, "chunked request bodies are not supported; send Content-Length"
            )
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise invalid_argument("Content-Length is not an integer") from None
        if length < 0:
            raise invalid_argument("Content-Length is negative")
        if length > limit:
            raise ServingError(
                Code.RESOURCE_EXHAUSTED, f"request body of {length} bytes exceeds the limit of {limit}"
            )
        return self.rfile.read(length)

    def _send(self, status: int, payload: dict, close: bool = False) -> None:
        body = json.dumps(payload).encode("utf-8")
        self._write(status, "application/json", body, close)

    def _send_text(self, status: int, text: str) -> None:
        self._write(status, "text/plain; version=0.0.4; charset=utf-8", text.encode("utf-8"), False)

    def _write(self, status: int, content_type: str, body: bytes, close: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: RestServer


class RestServer:
    """Serves the REST API of ``service`` on ``host:port`` in background threads.

    Args:
        service: the shared InferenceService.
        host: address to bind.
        port: port (0 picks a free one).
        metrics: the metrics rendered at ``metrics_path``.
        metrics_path: Prometheus endpoint path, or None for no endpoint.
        max_body_bytes: largest accepted request body.
    """

    def __init__(
        self,
        service: InferenceService,
        host: str,
        port: int,
        metrics: Metrics,
        metrics_path: str | None,
        max_body_bytes: int,
    ):
        self.service = service
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.max_body_bytes = max_body_bytes
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self._stopping = False
        self._idle = threading.Condition()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rest", daemon=True)
        self._thread.start()

    def stop(self, grace_seconds: float) -> None:
        """Stops accepting, waits for in-flight requests (up to ``grace_seconds``), closes."""
        with self._idle:
            self._stopping = True
        if self._thread is not None:  # shutdown() waits for serve_forever, so only if it runs
            self._httpd.shutdown()
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, grace_seconds)
        self._httpd.server_close()

    def begin_request(self) -> bool:
        with self._idle:
            if self._stopping:
                return False
            self._in_flight += 1
            return True

    def end_request(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    # === Routing ===

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        match = _ROUTE.match(path)
        verb = match and match["verb"]
        if match is None or (method == "POST") != bool(verb):
            raise not_found(f"Malformed request: {method} {path}")
        spec = model_pb2.ModelSpec(name=urllib.parse.unquote(match["name"]))
        if match["version"]:
            try:
                spec.version.value = int(match["version"])
            except ValueError:
                raise invalid_argument(f"version {match['version']} is out of range") from None
        elif match["label"]:
            spec.version_label = urllib.parse.unquote(match["label"])
        if verb:
            return 200, self._post(verb, spec, rest_json.parse_body(body))
        if match["metadata"]:
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec, metadata_field=["signature_def"]
            )
            return 200, _metadata_json(self.service.get_model_metadata(request, None, "REST"))
        response = self.service.get_model_status(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
        return 200, json_format.MessageToDict(
            response, preserving_proto_field_name=True, including_default_value_fields=True
        )

    def _post(self, verb: str, spec: model_pb2.ModelSpec, document: dict) -> dict:
        signature_name = document.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid_argument("'signature_name' must be a string")
        spec.signature_name = signature_name
        if verb == "predict":
            return self.service.serve(
                "predict", spec, None, "REST", lambda s, run: _predict(s, run, spec, document)
            )
        request_input = rest_json.example_input(document)
        if verb == "classify":
            request = classification_pb2.ClassificationRequest(model_spec=spec, input=request_input)
            return rest_json.classify_response(self.service.classify(request, None, "REST"))
        request = regression_pb2.RegressionRequest(model_spec=spec, input=request_input)
        return rest_json.regress_response(self.service.regress(request, None, "REST"))


def _predict(servable, run, spec: model_pb2.ModelSpec, document: dict) -> dict:
    signature = servable.signature(spec.signature_name)
    inputs, layout = rest_json.predict_inputs(document, signature)
    outputs = inference.predict_arrays(servable, spec.signature_name, inputs, (), run)
    return rest_json.predict_response(outputs, layout)


def _metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    spec = response.model_spec
    return {
        "model_spec": {"name": spec.name, "signature_name": "", "version": str(spec.version.value)},
        "metadata": {
            "signature_def": json_format.MessageToDict(signature_map, preserving_proto_field_name=True)
        },
    }
