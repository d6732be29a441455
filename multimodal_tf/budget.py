"""Time budgets: ``--time-budget 10m`` parsed, a shared deadline and its Keras callbacks.

A budget bounds a whole automatic run (``mmtf train --manifest`` without a
config), a configured run (``mmtf train --config C --time-budget``) or a
Keras Tuner search (``mmtf tune --time-budget``). Training stops at the next
batch boundary once the deadline has passed (Keras then still runs that
epoch's validation, so the checkpoint logic sees a scored epoch), and the
best weights or trial so far are kept. A configured run stops earlier by
what it still has to do after ``fit`` (:meth:`StopAtDeadline.plan_finish`),
so the whole command ends within its budget. Parsing imports no
TensorFlow, so the CLI can reject a bad value before loading it.
"""

from __future__ import annotations

import re
import time

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"10m"``, ``"1.5h"`` -> seconds.

    Raises:
        ValueError: not a positive number with an optional s/m/h unit.
    """
    match = _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"time budget {text!r}: expected a positive number with unit s, m or h (e.g. 10m)")
    return float(match.group(1)) * UNITS[(match.group(2) or "s").lower()]


def format_seconds(seconds: float) -> str:
    """``754.2`` -> ``"12:34"`` (minutes:seconds; hours as ``1:02:03``)."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Deadline:
    """A point in (monotonic) time, ``seconds`` after ``start`` (default: now); ``None`` = no limit."""

    def __init__(self, seconds: float | None, start: float | None = None):
        self.start = time.monotonic() if start is None else start
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        """Seconds left (infinite without a limit, never negative)."""
        if self.seconds is None:
            return float("inf")
        return max(0.0, self.seconds - self.elapsed())

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def sub(self, seconds: float) -> Deadline:
        """A deadline that ends ``seconds`` from now, and never after this one."""
        return Deadline(max(0.0, min(seconds, self.remaining())))


def keras_callbacks():
    """The callback classes (defined lazily: they need TensorFlow)."""
    from multimodal_tf.compat import keras  # noqa: PLC0415

    class StopAtDeadline(keras.callbacks.Callback):
        """Sets ``stop_training`` at the first batch that ends after ``deadline``.

        Keras checks the flag after every batch, so a run stops within one
        step of the deadline (plus that epoch's validation) instead of at the
        end of a long epoch. ``stopped`` says whether it fired;
        ``first_batch_end`` and ``last_batch_end`` (monotonic seconds) tell
        a caller what a run spent before and after its batches.

        With :meth:`plan_finish` it stops early enough for the work left
        after ``fit``: the stopped epoch's validation plus ``passes`` more
        passes over the validation data (calibration, final metrics; the
        test split counted in validation-pass units), each priced at the
        slowest validation pass seen, and ``seconds`` of file writing.
        """

        def __init__(self, deadline: Deadline, record: dict | None = None):
            super().__init__()
            self.deadline = deadline
            self.stopped = False
            self.first_batch_end = self.last_batch_end = None
            self.passes, self.finish_seconds = None, 0.0  # None: stop at the deadline itself
            self.validation_seconds, self._test_started = 0.0, None
            # Shared by copies (Keras Tuner deep-copies callbacks per trial):
            # the monotonic time each fit's first batch ended.
            self.record = {} if record is None else record

        def __deepcopy__(self, memo):
            return type(self)(self.deadline, self.record)

        def plan_finish(self, passes: float, seconds: float = 0.0) -> None:
            """Reserves time for ``passes`` validation passes and ``seconds`` more after ``fit``."""
            self.passes, self.finish_seconds = passes, seconds

        def reserve(self) -> float:
            """Seconds kept back from the deadline (0 until a validation pass has been timed)."""
            if self.passes is None:
                return 0.0
            return (1.0 + self.passes) * self.validation_seconds + self.finish_seconds

        def on_test_begin(self, logs=None):
            self._test_started = time.monotonic()

        def on_test_end(self, logs=None):
            if self._test_started is not None:
                spent = time.monotonic() - self._test_started
                self.validation_seconds = max(self.validation_seconds, spent)

        def on_train_batch_end(self, batch, logs=None):
            self.last_batch_end = time.monotonic()
            if self.first_batch_end is None:
                self.first_batch_end = self.record["first_batch_end"] = self.last_batch_end
            if self.deadline.remaining() <= self.reserve():
                self.stopped = True
                self.model.stop_training = True

    class BudgetProgress(keras.callbacks.Callback):
        """Moves a tqdm bar of the whole budget (in seconds) and names what is training."""

        def __init__(self, bar, budget: Deadline, label: str):
            super().__init__()
            self.bar, self.budget, self.label = bar, budget, label
            self._last = 0.0

        def _show(self, text: str, force: bool = False) -> None:
            now = time.monotonic()
            if not force and now - self._last < 0.5:
                return
            self._last = now
            self.bar.set_description_str(f"{self.label}: {text}", refresh=False)
            self.bar.set_postfix_str(f"left {format_seconds(self.budget.remaining())}", refresh=False)
            self.bar.n = min(self.bar.total, round(self.budget.elapsed(), 1))
            self.bar.refresh()

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch + 1
            self._show(f"epoch {self._epoch}", force=True)

        def on_train_batch_end(self, batch, logs=None):
            self._show(f"epoch {self._epoch}")

        def on_epoch_end(self, epoch, logs=None):
            loss = (logs or {}).get("val_loss")
            self._show(f"epoch {epoch + 1}" + (f" val_loss {loss:.3f}" if loss is not None else ""), True)

    return StopAtDeadline, BudgetProgress
