"""Which model versions are loaded: polling, version policies, hot reload.

Like TF Serving's AspiredVersionsManager with its availability-preserving
policy: a new version is loaded (and warmed up) before the version it
replaces is unloaded, and an unloaded version is freed only once no request
holds it, so a reload never fails an in-flight or new request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from tensorflow_serving.apis import get_model_status_pb2

from multimodal_tf.serving import inference
from multimodal_tf.serving.config import ModelSpec
from multimodal_tf.serving.errors import ServingError, invalid_argument, not_found
from multimodal_tf.serving.servable import Servable, describe_error

State = get_model_status_pb2.ModelVersionStatus.State
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VersionStatus:
    """What GetModelStatus reports for one version."""

    version: int
    state: int = State.START
    error: ServingError | None = None
    servable: Servable | None = None
    fingerprint: tuple | None = None  # of the folder whose load failed


@dataclasses.dataclass
class _Model:
    spec: ModelSpec
    versions: dict[int, VersionStatus] = dataclasses.field(default_factory=dict)


def _fingerprint(path: Path) -> tuple:
    """Every file's (name, size, mtime) under a version folder.

    Changes when any file is rewritten or grows (a copy still in progress),
    so a failed load is retried then; folder mtimes alone miss a file that
    is appended to in place.
    """
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:
                continue
            entries.append((os.path.relpath(os.path.join(root, name), path), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def list_versions(base_path: str) -> dict[int, Path] | None:
    """Numeric version folders under ``base_path``; None if it cannot be read.

    Other names (``.tmp-3-x``, ``exports``) are ignored, which is what makes
    "write to a temporary folder, then rename" an atomic publish.
    """
    try:
        entries = list(os.scandir(base_path))
    except OSError:
        return None
    return {int(e.name): Path(e.path) for e in entries if e.name.isdigit() and e.is_dir()}


class ModelManager:
    """Loads and serves the versions that each model's policy asks for.

    Args:
        specs: the models to serve.
        poll_wait_seconds: seconds between polls of the base paths; 0 polls
            once at start (TF Serving's ``--file_system_poll_wait_seconds``).
        warmup: replay ``assets.extra/tf_serving_warmup_requests`` before a
            version becomes AVAILABLE.
        max_num_load_retries: retries of a failed load (TF Serving's
            ``--max_num_load_retries``, default 5), e.g. of a version that was
            still being copied when it was first seen.
        load_retry_interval_seconds: wait between retries (TF Serving's
            ``--load_retry_interval_micros``, default 60 s).
    """

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        poll_wait_seconds: float = 1.0,
        warmup: bool = True,
        max_num_load_retries: int = 5,
        load_retry_interval_seconds: float = 60.0,
    ):
        if max_num_load_retries < 0 or load_retry_interval_seconds < 0:
            raise ValueError("max_num_load_retries and load_retry_interval_seconds must be >= 0")
        self.poll_wait_seconds = poll_wait_seconds
        self.warmup = warmup
        self.max_num_load_retries = max_num_load_retries
        self.load_retry_interval_seconds = load_retry_interval_seconds
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()  # one poll (and so one load) at a time
        self._models: dict[str, _Model] = {spec.name: _Model(spec) for spec in specs}
        self._retiring: list[VersionStatus] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreadable: set[str] = set()

    # === Lifecycle ===

    def start(self) -> None:
        """Loads what the policies ask for now, then keeps polling in the background."""
        self.poll_once()
        if self.poll_wait_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops polling and unloads every version once its requests finish (or ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for model in self._models.values():
                for status in model.versions.values():
                    if status.state == State.AVAILABLE:
                        self._retire(status)
        for status in list(self._retiring):
            if status.servable is not None:
                status.servable.wait_idle(timeout)
        self._reap()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad folder
                logger.exception("model poll failed")

    def set_config(self, specs: Sequence[ModelSpec]) -> None:
        """Replaces the served models (a new model config), then polls."""
        with self._poll_lock, self._lock:
            wanted = {spec.name: spec for spec in specs}
            for name in list(self._models):
                if name not in wanted:
                    for status in self._models.pop(name).versions.values():
                        if status.state == State.AVAILABLE:
                            self._retire(status)
            for name, spec in wanted.items():
                if name in self._models:
                    self._models[name].spec = spec
                else:
                    self._models[name] = _Model(spec)
        self.poll_once()

    # === Polling ===

    def poll_once(self) -> None:
        """One pass: load aspired versions, then unload those no longer aspired."""
        with self._poll_lock:
            with self._lock:
                models = list(self._models.values())
            for model in models:
                self._poll_model(model)
            self._reap()

    def _poll_model(self, model: _Model) -> None:
        spec = model.spec
        on_disk = list_versions(spec.base_path)
        if on_disk is None:
            if spec.name not in self._unreadable:
                logger.warning(
                    "model %s: cannot read base path %s; keeping what is loaded", spec.name, spec.base_path
                )
                self._unreadable.add(spec.name)
            return
        self._unreadable.discard(spec.name)
        aspired = spec.aspired_versions(list(on_disk))
        for version in aspired:  # newest first: it serves "latest" soonest
            if self._stop.is_set():
                return
            if self._needs_load(model, version, on_disk[version]):
                self._load(model, version, on_disk[version])
        with self._lock:
            available = [
                v for v in aspired if model.versions.get(v) and model.versions[v].state == State.AVAILABLE
            ]
            for version, status in model.versions.items():
                if version not in aspired and status.state == State.AVAILABLE and (available or not aspired):
                    self._retire(status)

    def _needs_load(self, model: _Model, version: int, path: Path) -> bool:
        status = model.versions.get(version)
        if status is None or status.state == State.START:
            return True
        if status.state != State.END:
            return False
        return status.error is None or status.fingerprint != _fingerprint(path)

    def _load(self, model: _Model, version: int, path: Path) -> None:
        """Loads a version, retrying failures as TF Serving's AspiredVersionsManager does."""
        name = model.spec.name
        with self._lock:
            status = VersionStatus(version, State.LOADING)
            model.versions[version] = status
        for attempt in range(self.max_num_load_retries + 1):
            if attempt:
                logger.info(
                    "model %s: retrying version %d in %.1f s (retry %d of %d)",
                    name, version, self.load_retry_interval_seconds, attempt, self.max_num_load_retries,
                )  # fmt: skip
                if self._stop.wait(self.load_retry_interval_seconds):
                    break
            fingerprint = _fingerprint(path)
            try:
                servable = self._load_once(name, version, path)
            except Exception as e:  # noqa: BLE001 - any failure is this version's status
                error = describe_error(e)
                logger.error("model %s: version %d failed to load: %s", name, version, error.message)
                continue
            with self._lock:
                status.servable, status.state, status.error = servable, State.AVAILABLE, None
            logger.info("model %s: version %d is AVAILABLE", name, version)
            return
        with self._lock:
            status.state, status.error, status.fingerprint = State.END, error, fingerprint

    def _load_once(self, name: str, version: int, path: Path) -> Servable:
        logger.info("model %s: loading version %d from %s", name, version, path)
        servable = Servable(name, version, path)
        if self.warmup:
            count = inference.replay_warmup(servable)
            logger.info("model %s version %d: replayed %d warmup requests", name, version, count)
        return servable

    def _retire(self, status: VersionStatus) -> None:
        """Stops routing to a version; it is freed by ``_reap`` once idle. Caller holds the lock."""
        status.state = State.UNLOADING
        self._retiring.append(status)

    def _reap(self) -> None:
        with self._lock:
            for status in list(self._retiring):
                if status.servable is None or status.servable.in_flight == 0:
                    if status.servable is not None:
                        status.servable.close()
                    status.servable, status.state = None, State.END
                    self._retiring.remove(status)

    # === Requests ===

    def _resolve(self, name: str, version: int | None, label: str | None) -> VersionStatus:
        model = self._models.get(name)
        if model is None:
            raise not_found(f"Servable not found for request: Latest({name})")
        if label:
            labels = model.spec.labels
            if label not in labels:  # INVALID_ARGUMENT, as TF Serving's ServerCore
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            version = labels[label]
        if version is not None:
            status = model.versions.get(version)
            if status is None or status.state != State.AVAILABLE:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return status
        available = [s for s in model.versions.values() if s.state == State.AVAILABLE]
        if not available:
            raise not_found(f"Servable not found for request: Latest({name})")
        return max(available, key=lambda s: s.version)

    @contextlib.contextmanager
    def servable(self, name: str, version: int | None = None, label: str | None = None) -> Iterator[Servable]:
        """Holds a servable for one request; it is not freed until released."""
        with self._lock:
            status = self._resolve(name, version, label)
            servable = status.servable
            servable.acquire()
        try:
            yield servable
        finally:
            servable.release()
            if status.state == State.UNLOADING and servable.in_flight == 0:
                self._reap()

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Version statuses, newest first (GetModelStatus)."""
        with self._lock:
            model = self._models.get(name)
            if model is None or not model.versions:
                raise not_found(f"Could not find any versions of model {name}")
            if version is not None:
                if version not in model.versions:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [dataclasses.replace(model.versions[version])]
            return [dataclasses.replace(model.versions[v]) for v in sorted(model.versions, reverse=True)]
