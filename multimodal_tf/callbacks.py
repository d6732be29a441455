"""Keras callbacks of the training recipe (see ``recipe.callbacks_for``)."""

from __future__ import annotations

import time

from multimodal_tf.compat import keras, tf


class Throughput(keras.callbacks.Callback):
    """Adds ``examples_per_second`` to the epoch logs and prints it."""

    def __init__(self, batch_size: int, verbose: int = 1, steps_per_epoch: int | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.verbose = verbose
        self.steps_per_epoch = steps_per_epoch

    def _implements_train_batch_hooks(self):
        # A known step count needs no batch hook, and ParameterServerStrategy
        # rejects callbacks that have one.
        return self.steps_per_epoch is None

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        steps = self.steps_per_epoch or self._steps
        rate = steps * self.batch_size / max(time.perf_counter() - self._start, 1e-9)
        if logs is not None:
            logs["examples_per_second"] = rate
        if self.verbose:
            print(f"epoch {epoch + 1}: {rate:,.0f} examples/s")


class SwapEMAWeights(keras.callbacks.Callback):
    """Puts the optimizer's moving-average weights in the model between epochs.

    The optimizer keeps the average (``use_ema``) but Keras 2 only copies it
    into the model when ``fit`` ends, so validation, best-checkpoint choice
    and early stopping would judge the raw weights. This callback swaps the
    average in before validation and keeps it there through ``on_epoch_end``
    (it must come before the checkpoint and early-stopping callbacks), then
    puts the raw weights back before the next epoch trains. A run resumed by
    ``BackupAndRestore`` restarts from the averaged weights.
    """

    def __init__(self):
        super().__init__()
        self._raw = None

    def _swap_in(self):
        if self._raw is None:
            variables = self.model.trainable_variables
            self._raw = [tf.identity(v) for v in variables]
            self.model.optimizer.finalize_variable_values(variables)  # public API: assigns the average

    def on_test_begin(self, logs=None):
        self._swap_in()

    def on_epoch_end(self, epoch, logs=None):
        self._swap_in()  # also without validation data

    def on_epoch_begin(self, epoch, logs=None):
        if self._raw is not None:
            for variable, value in zip(self.model.trainable_variables, self._raw, strict=True):
                variable.assign(value)
            self._raw = None

    def on_train_end(self, logs=None):
        self._raw = None  # fit already left the average (or the restored best) in place
