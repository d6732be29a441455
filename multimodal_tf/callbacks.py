"""Keras callbacks of the training recipe (see ``recipe.callbacks_for``)."""

from __future__ import annotations

import time

from multimodal_tf import fine_tuning
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
            # (variable, value) pairs: FineTuningSchedule changes which
            # variables are trainable between the swap and the restore.
            self._raw = [(v, tf.identity(v)) for v in variables]
            self.model.optimizer.finalize_variable_values(variables)  # public API: assigns the average

    def on_test_begin(self, logs=None):
        self._swap_in()

    def on_epoch_end(self, epoch, logs=None):
        self._swap_in()  # also without validation data

    def on_epoch_begin(self, epoch, logs=None):
        if self._raw is not None:
            for variable, value in self._raw:
                variable.assign(value)
            self._raw = None

    def on_train_end(self, logs=None):
        self._raw = None  # fit already left the average (or the restored best) in place


class FineTuningSchedule(keras.callbacks.Callback):
    """Two-phase fine-tuning: encoders frozen before their ``unfreeze_at_epoch``, trained after.

    Each epoch trains with the phase's flags (fine_tuning.apply_phase) and a
    train function traced for them: a traced train step keeps the variable
    list it was traced with, so changing ``trainable`` alone would change
    nothing (tf_keras's advice is to recompile). One function is kept per
    phase, so an unfrozen epoch traces once, not once per epoch.

    Outside the training steps of an epoch (validation, checkpoints, early
    stopping's saved weights, the end of ``fit``) the model has the flags it
    was built with again: ``.h5`` weight files and ``get_weights`` order each
    layer's variables trainable first, so a checkpoint written while an
    encoder was frozen would not load into a freshly built model.

    Must come after SwapEMAWeights (which swaps the average of the variables
    trained this epoch in before validation). The optimizer must already be
    built on every variable of every phase (fine_tuning.variables_ever_trained;
    recipe.compile_model does it).

    Args:
        schedule: encoder layer name -> first epoch (0-based) it is trained in.
    """

    def __init__(self, schedule: dict[str, int]):
        super().__init__()
        self.schedule = dict(schedule)
        self._built_state = None
        self._functions = {}

    def on_train_begin(self, logs=None):
        self._built_state = fine_tuning.trainable_state(self.model)
        self._functions = {}

    def on_epoch_begin(self, epoch, logs=None):
        phase = fine_tuning.apply_phase(self.model, self.schedule, epoch)
        if phase not in self._functions:
            self._functions[phase] = self.model.make_train_function(force=True)
        self.model.train_function = self._functions[phase]

    def _restore(self):
        if self._built_state is not None:
            fine_tuning.set_trainable_state(self.model, self._built_state)

    def on_test_begin(self, logs=None):
        self._restore()

    def on_epoch_end(self, epoch, logs=None):
        self._restore()

    def on_train_end(self, logs=None):
        self._restore()
        self.model.train_function = None  # a later fit traces for the flags it finds
