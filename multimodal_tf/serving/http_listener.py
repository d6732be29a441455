"""The REST API's HTTP listener: a bounded worker pool with whole-request deadlines.

``http.server.ThreadingHTTPServer`` listens with a backlog of 5, starts one
thread per connection without limit, and only bounds each ``recv`` (a client
sending one byte every few seconds holds a thread forever). This listener
instead:

* listens with a realistic backlog (``BACKLOG``), so bursts of connects are
  queued by the kernel instead of being dropped into SYN retries;
* hands accepted connections to ``num_workers`` threads through a queue of
  ``max_queued`` connections; beyond that a connection is answered 503 at
  once and closed (load shedding, not an unbounded thread count);
* gives the whole of each request (request line, headers and body, and the
  idle wait for the next request on a keep-alive connection) one deadline:
  a watchdog shuts the socket down when it passes, whatever the sender's
  pace;
* with an SSL context, runs each TLS handshake in the worker (under the
  same deadline), never in the accepting thread, so a slow or plain-text
  client cannot stall ``accept``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import socket
import socketserver
import ssl
import threading
import time

logger = logging.getLogger(__name__)

# Connections the kernel queues before accept(); the default of 5 made 13-41
# of 64 simultaneous connects wait >= 1 s in SYN retries.
BACKLOG = 1024
_OVERLOADED_BODY = b'{"error": "server overloaded; retry later"}'
_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_OVERLOADED_BODY), _OVERLOADED_BODY)
)


class Watchdog:
    """Shuts down sockets whose read deadline has passed (one thread for all of them)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._armed: dict[int, int] = {}  # id(socket) -> token of its live deadline
        self._tokens = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="rest-watchdog", daemon=True)
        self._thread.start()

    def arm(self, sock: socket.socket, seconds: float) -> None:
        """The socket is shut down unless :meth:`disarm` is called within ``seconds``."""
        with self._cond:
            token = next(self._tokens)
            self._armed[id(sock)] = token
            heapq.heappush(self._heap, (time.monotonic() + seconds, token, sock))
            self._cond.notify()

    def disarm(self, sock: socket.socket) -> None:
        with self._cond:
            self._armed.pop(id(sock), None)

    def expire_all(self) -> None:
        """Shuts down every armed socket now (server stop: no idle keep-alive outlives it)."""
        with self._cond:
            for _, token, sock in self._heap:
                if self._armed.get(id(sock)) == token:
                    _shutdown(sock)
            self._heap.clear()
            self._armed.clear()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, token, sock = heapq.heappop(self._heap)
                    if self._armed.get(id(sock)) == token:
                        del self._armed[id(sock)]
                        logger.info("REST: closing a connection whose request missed its deadline")
                        _shutdown(sock)
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by its worker
        pass


class PooledHTTPServer(socketserver.TCPServer):
    """A TCP server whose connections are served by a fixed pool of threads.

    Args:
        address: (host, port) to bind.
        handler_class: the ``BaseHTTPRequestHandler`` subclass.
        num_workers: threads serving connections.
        max_queued: accepted connections that may wait for a worker.
        request_deadline_seconds: the most one request may take to arrive.
        ssl_context: server-side context to serve TLS with (None: plain text).
    """

    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(
        self,
        address,
        handler_class,
        num_workers: int,
        max_queued: int,
        request_deadline_seconds: float,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.request_deadline_seconds = request_deadline_seconds
        self.ssl_context = ssl_context
        self.watchdog = Watchdog()
        self._queue: queue.Queue = queue.Queue(max_queued)
        self._closing = threading.Event()
        super().__init__(address, handler_class)
        self._workers = [
            threading.Thread(target=self._work, name=f"rest-{i}", daemon=True) for i in range(num_workers)
        ]
        for worker in self._workers:
            worker.start()

    def process_request(self, request, client_address):
        try:
            self._queue.put_nowait((request, client_address))
        except queue.Full:
            logger.warning("REST: %d connections waiting for a worker; refusing one", self._queue.maxsize)
            try:
                request.settimeout(1.0)
                request.sendall(_OVERLOADED)
            except OSError:
                pass
            self.shutdown_request(request)

    def _work(self) -> None:
        while not self._closing.is_set():
            try:
                request, client_address = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                request = self._secure(request)
                self.finish_request(request, client_address)
            # The client went away, the watchdog cut it off, or (ssl.SSLError)
            # its TLS handshake failed: plain text, or no client certificate.
            except OSError as e:
                logger.info("REST: connection from %s ended: %s", client_address[0], e)
            except Exception:  # noqa: BLE001 - one connection's failure must not end the worker
                logger.warning("REST: connection from %s failed", client_address[0], exc_info=True)
            finally:
                self.watchdog.disarm(request)
                self.shutdown_request(request)

    def _secure(self, request: socket.socket) -> socket.socket:
        """The connection after its TLS handshake (unchanged without an SSL context)."""
        if self.ssl_context is None:
            return request
        tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(self.request_deadline_seconds)
        self.watchdog.arm(tls, self.request_deadline_seconds)
        try:
            tls.do_handshake()
        except BaseException:
            self.watchdog.disarm(tls)
            tls.close()
            raise
        self.watchdog.disarm(tls)
        return tls

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()
        self.watchdog.expire_all()
        self.watchdog.stop()
        while True:  # connections still queued are closed unanswered
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self.shutdown_request(item[0])
