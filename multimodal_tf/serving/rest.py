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
from http.server import BaseHTTPRequestHandler

from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    regression_pb2,
)

from multimodal_tf.compat import message_to_dict
from multimodal_tf.serving import inference, rest_json
from multimodal_tf.serving.errors import Code, ServingError, invalid_argument, not_found
from multimodal_tf.serving.http_listener import PooledHTTPServer
from multimodal_tf.serving.metrics import Metrics
from multimodal_tf.serving.service import InferenceService

logger = logging.getLogger(__name__)

# TF Serving's routes (http_rest_api_handler.cc): matched case-insensitively
# and in full (no trailing slash); the verb itself must be lower case.
_PREDICT_ROUTE = re.compile(
    r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r":(?P<verb>classify|regress|predict)",
    re.IGNORECASE,
)
_STATUS_ROUTE = re.compile(
    r"/v1/models(?:/(?P<name>[^/:]+))?(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:/(?P<metadata>metadata))?",
    re.IGNORECASE,
)
_API_PREFIX = re.compile(r"/v1/", re.IGNORECASE)
_VERBS = ("classify", "regress", "predict")
# The most one request (request line, headers, body; or the idle wait for the
# next request on a keep-alive connection) may take to arrive.
REQUEST_DEADLINE_SECONDS = 30.0
# Sent when the request has an Origin header (browsers), and on preflight.
_CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "POST, GET"),
    ("Access-Control-Allow-Headers", "Content-Type"),
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self):
        # No recv may wait longer than the whole request may take.
        self.timeout = self.server.request_deadline_seconds
        super().setup()
        # Headers and body are separate writes; without this, Nagle's algorithm
        # and the client's delayed ACK add ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self):
        watchdog = self.server.watchdog
        watchdog.arm(self.connection, self.server.request_deadline_seconds)
        try:
            super().handle_one_request()
        finally:
            watchdog.disarm(self.connection)

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        logger.debug("%s - %s", self.address_string(), format % args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (414, 431, 501, 400 ...) as JSON, like every other answer."""
        try:
            short = self.responses[code][0]
        except KeyError:
            short = "error"
        self._send(code, {"error": message or short}, close=True)

    def do_GET(self):  # noqa: N802 - http.server's names
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_OPTIONS(self):  # noqa: N802
        """CORS preflight, as TF Serving answers it: 200 with the allowed methods and headers."""
        self._write(200, "application/json", b"", False)

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
            self.server.watchdog.disarm(self.connection)  # arrived; the model may take its time
            status, payload = owner.handle(method, path, body)
            self._send(status, payload)
        except ServingError as e:
            self._send(e.http_status, {"error": e.message}, close=e.code == Code.RESOURCE_EXHAUSTED)
        except (ConnectionError, TimeoutError) as e:
            logger.info("REST: %s %s: connection lost (%s)", method, self.path[:200], e)
            self.close_connection = True
        except RecursionError:
            logger.warning("REST: %s %s: request nested too deeply", method, self.path[:200])
            self._send(400, {"error": "request is nested too deeply"})
        except Exception as e:  # noqa: BLE001 - answer, never drop the connection silently
            logger.exception("REST request failed")
            self._send(500, {"error": f"{type(e).__name__}: {e}"})
        finally:
            owner.end_request()

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise invalid_argument("Content-Length is not an integer") from None
        if length < 0:
            raise invalid_argument("Content-Length is negative")
        _check_size(length, limit)
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionError(f"body ended after {len(body)} of {length} bytes")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        """A ``Transfer-Encoding: chunked`` body (TF Serving's libevent server accepts these)."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise ConnectionError("chunked body ended inside a chunk header")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise invalid_argument(f"malformed chunk size line {line[:40]!r}") from None
            if size == 0:
                break
            total += size
            _check_size(total, limit)
            chunk = self.rfile.read(size + 2)  # the data and its CRLF
            if len(chunk) != size + 2:
                raise ConnectionError("chunked body ended inside a chunk")
            parts.append(chunk[:size])
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(parts)

    def _send(self, status: int, payload: dict, close: bool = False) -> None:
        body = json.dumps(payload).encode("utf-8")
        self._write(status, "application/json", body, close)

    def _send_text(self, status: int, text: str) -> None:
        self._write(status, "text/plain; version=0.0.4; charset=utf-8", text.encode("utf-8"), False)

    def _write(self, status: int, content_type: str, body: bytes, close: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if getattr(self, "headers", None) is not None and self.headers.get("Origin"):
            for name, value in _CORS_HEADERS:
                self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


def _check_size(length: int, limit: int) -> None:
    if length > limit:
        raise ServingError(
            Code.RESOURCE_EXHAUSTED, f"request body of {length} bytes exceeds the limit of {limit}"
        )


class _HTTPServer(PooledHTTPServer):
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
        num_workers: threads serving connections (an idle keep-alive connection holds one
            until its next request's deadline).
        max_queued: connections that may wait for a worker before new ones get 503.
        request_deadline_seconds: the most one request may take to arrive.
        ssl_context: serve HTTPS with this server-side context (None: plain HTTP).
    """

    def __init__(
        self,
        service: InferenceService,
        host: str,
        port: int,
        metrics: Metrics,
        metrics_path: str | None,
        max_body_bytes: int,
        num_workers: int = 32,
        max_queued: int = 256,
        request_deadline_seconds: float = REQUEST_DEADLINE_SECONDS,
        ssl_context=None,
    ):
        self.service = service
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.max_body_bytes = max_body_bytes
        self._httpd = _HTTPServer(
            (host, port), _Handler, num_workers, max_queued, request_deadline_seconds, ssl_context
        )
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
        if not _API_PREFIX.match(path):
            raise not_found(f"Malformed request: {method} {path} (the API is under /v1/)")
        match = _PREDICT_ROUTE.fullmatch(path) if method == "POST" else _STATUS_ROUTE.fullmatch(path)
        verb = match and match.groupdict().get("verb")
        if match is None or (verb is not None and verb not in _VERBS):
            raise invalid_argument(f"Malformed request: {method} {path}")
        if not match["name"]:
            raise invalid_argument("Missing model name in request.")
        spec = model_pb2.ModelSpec(name=urllib.parse.unquote(match["name"]))
        if match["version"]:
            version = int(match["version"])
            if version >= 2**63:
                raise invalid_argument(f"Failed to convert version: {match['version']} to numeric.")
            spec.version.value = version
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
        return 200, message_to_dict(response)

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
    optional = servable.optional_inputs.get(spec.signature_name, ())
    inputs, layout = rest_json.predict_inputs(document, signature, optional)
    outputs = inference.predict_arrays(servable, spec.signature_name, inputs, (), run)
    return rest_json.predict_response(outputs, layout)


def _metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    spec = response.model_spec
    return {
        "model_spec": {"name": spec.name, "signature_name": "", "version": str(spec.version.value)},
        "metadata": {
            # Default-valued fields (an empty method_name, a 0 dim) printed, as TF Serving's
            # always_print_primitive_fields does.
            "signature_def": message_to_dict(signature_map)
        },
    }
