"""Server-side batching with TF Serving's parameters (a SharedBatchScheduler).

Requests for the same model version and signature whose inputs have the same
names, dtypes and non-batch shapes are concatenated along dimension 0, run
once and split back. A batch is closed when it is full or when its oldest
request has waited ``batch_timeout_micros`` and a batch thread is free.
Over ``max_enqueued_batches`` waiting batches per queue, requests fail
UNAVAILABLE, as in TF Serving.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Hashable, Mapping

import numpy as np

from multimodal_tf.serving.config import BatchingOptions
from multimodal_tf.serving.errors import Code, ServingError

Outputs = dict[str, np.ndarray]
RunFn = Callable[[Mapping[str, np.ndarray]], Outputs]


@dataclasses.dataclass
class _Task:
    inputs: Mapping[str, np.ndarray]
    size: int
    future: concurrent.futures.Future


@dataclasses.dataclass
class _Batch:
    queue: Hashable
    key: Hashable
    run: RunFn
    created: float
    tasks: list[_Task] = dataclasses.field(default_factory=list)
    size: int = 0


def _split(outputs: Outputs, sizes: list[int], padded_total: int) -> list[Outputs]:
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != padded_total:
            raise ServingError(
                Code.INTERNAL,
                f"batched output '{name}' has shape {list(value.shape)}; its 0th dimension must equal the "
                f"batch size {padded_total} for batching (disable batching for this model)",
            )
    offsets = np.cumsum([0] + sizes)
    return [
        {name: value[start:end] for name, value in outputs.items()}
        for start, end in zip(offsets, offsets[1:], strict=False)
    ]


class BatchScheduler:
    """Merges concurrent requests into batches run on ``num_batch_threads`` threads."""

    def __init__(self, options: BatchingOptions):
        self.options = options
        self._cond = threading.Condition()
        self._open: dict[tuple, _Batch] = {}
        self._ready: collections.deque[_Batch] = collections.deque()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, queue: Hashable, key: Hashable, run: RunFn, inputs: Mapping[str, np.ndarray], size: int):
        """Enqueues one request of ``size`` examples; returns a Future of its outputs.

        Args:
            queue: the model version + signature (TF Serving's per-servable queue).
            key: what must match for requests to merge (input names, dtypes, shapes).
            run: runs the signature on merged inputs.
            inputs: this request's inputs, batch dimension first.
            size: this request's batch size (<= the execution batch size; the caller
                splits larger requests, as TF Serving's large batch splitting does).
        """
        task = _Task(inputs, size, concurrent.futures.Future())
        max_size = self.options.execution_batch_size
        with self._cond:
            if self._stopped:
                raise ServingError(Code.UNAVAILABLE, "server is shutting down")
            batch = self._open.get((queue, key))
            if batch is not None and batch.size + size > max_size:
                self._close(batch)
                batch = None
            if batch is None:
                if self._queued(queue) >= self.options.max_enqueued_batches:
                    raise ServingError(
                        Code.UNAVAILABLE,
                        "The batch scheduling queue to which this task was submitted is full",
                    )
                batch = _Batch(queue, key, run, time.monotonic())
                self._open[(queue, key)] = batch
            batch.tasks.append(task)
            batch.size += size
            if batch.size >= max_size:
                self._close(batch)
            self._cond.notify()
        return task.future

    def stop(self, timeout: float = 10.0) -> None:
        """Runs what is queued, then stops the threads."""
        with self._cond:
            self._stopped = True
            for batch in list(self._open.values()):
                self._close(batch)
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # === Internals (the caller holds self._cond) ===

    def _queued(self, queue: Hashable) -> int:
        return sum(1 for b in self._open.values() if b.queue == queue) + sum(
            1 for b in self._ready if b.queue == queue
        )

    def _close(self, batch: _Batch) -> None:
        del self._open[(batch.queue, batch.key)]
        self._ready.append(batch)

    def _next_batch(self) -> _Batch | None:
        timeout = self.options.batch_timeout_micros / 1e6
        while True:
            if self._ready:
                return self._ready.popleft()
            if self._open:
                oldest = min(self._open.values(), key=lambda b: b.created)
                wait = oldest.created + timeout - time.monotonic()
                if wait <= 0:
                    self._close(oldest)
                    continue
                self._cond.wait(wait)
                continue
            if self._stopped:
                return None
            self._cond.wait()

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            tasks = [t for t in batch.tasks if t.future.set_running_or_notify_cancel()]
            if tasks:
                self._process(batch.run, tasks)

    # === Running a batch ===

    def _padded_size(self, total: int) -> int:
        sizes = self.options.allowed_batch_sizes
        index = bisect.bisect_left(sizes, total)
        return sizes[index] if index < len(sizes) else total

    def _process(self, run: RunFn, tasks: list[_Task]) -> None:
        sizes = [t.size for t in tasks]
        total = sum(sizes)
        padded = self._padded_size(total)
        merged = {}
        for name in tasks[0].inputs:
            parts = [t.inputs[name] for t in tasks]
            if padded > total:  # repeat the first example, as TF Serving pads
                parts.append(np.repeat(parts[0][:1], padded - total, axis=0))
            merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        try:
            pieces = _split(run(merged), sizes, padded)
        except ServingError as e:
            if e.code == Code.INVALID_ARGUMENT and len(tasks) > 1:
                # One bad request must not fail the others merged with it.
                for task in tasks:
                    self._process(run, [task])
                return
            for task in tasks:
                task.future.set_exception(e)
            return
        except Exception as e:  # noqa: BLE001 - must reach every waiting caller
            for task in tasks:
                task.future.set_exception(e)
            return
        for task, piece in zip(tasks, pieces, strict=False):
            task.future.set_result(piece)
