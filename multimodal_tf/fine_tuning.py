"""Per-encoder learning rates and two-phase fine-tuning, for the training recipe.

Every encoder config has ``learning_rate_multiplier`` and
``unfreeze_at_epoch`` (config.EncoderConfig). :mod:`multimodal_tf.recipe`
turns them into an optimizer with per-variable learning rates
(:class:`LearningRateMultipliers`) and, with ``unfreeze_at_epoch``, the
:class:`multimodal_tf.callbacks.FineTuningSchedule` callback: the usual
"train the new layers on a frozen pretrained encoder, then unfreeze it at a
lower rate" recipe, implemented once for every encoder family.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Sequence

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import MODALITIES, ModelConfig


class LearningRateMultipliers:
    """Mixin giving a tf_keras optimizer a learning rate per variable group.

    Adam and its kin are invariant to the scale of the gradient, so scaling
    gradients (the usual shortcut) changes nothing. Here each variable's
    update is computed with ``learning_rate * multiplier`` (schedules
    included): the optimizer's own ``update_step`` and decoupled weight decay
    read ``self.learning_rate`` while one variable is updated, and this mixin
    answers with the multiplied rate then. A multiplier of 0 skips the
    variable. Variables without a multiplier use 1.
    """

    _active_multiplier = 1.0

    def set_learning_rate_multipliers(self, groups: Iterable[tuple[Sequence[tf.Variable], float]]) -> None:
        """``groups``: (variables, multiplier) pairs; later pairs win for a variable in two."""
        self._multipliers = {self._var_key(v): float(m) for variables, m in groups for v in variables}

    def learning_rate_multiplier(self, variable) -> float:
        return getattr(self, "_multipliers", {}).get(self._var_key(variable), 1.0)

    @contextlib.contextmanager
    def _multiplied(self, multiplier: float):
        self._active_multiplier = multiplier
        try:
            yield
        finally:
            self._active_multiplier = 1.0

    @property
    def learning_rate(self):
        rate = super().learning_rate
        return rate if self._active_multiplier == 1.0 else rate * self._active_multiplier

    @learning_rate.setter
    def learning_rate(self, value):
        super(LearningRateMultipliers, type(self)).learning_rate.fset(self, value)

    def _update_step(self, gradient, variable):
        multiplier = self.learning_rate_multiplier(variable)
        if multiplier == 0.0:
            return
        with self._multiplied(multiplier):
            super()._update_step(gradient, variable)

    def _apply_weight_decay(self, variables):
        groups: dict[float, list] = {}
        for variable in variables:
            groups.setdefault(self.learning_rate_multiplier(variable), []).append(variable)
        for multiplier, members in groups.items():
            if multiplier != 0.0:
                with self._multiplied(multiplier):
                    super()._apply_weight_decay(members)


@functools.cache
def with_learning_rate_multipliers(optimizer_class: type) -> type:
    """``optimizer_class`` (a tf_keras optimizer) with :class:`LearningRateMultipliers` mixed in."""
    return type(optimizer_class.__name__, (LearningRateMultipliers, optimizer_class), {})


def encoder_name(modality: str) -> str:
    """The layer name build_model gives ``modality``'s encoder."""
    return f"{modality}_encoder"


def encoder_layers(model: keras.Model, name: str) -> list[keras.layers.Layer]:
    """The layers named ``name`` in ``model`` and in its nested models (ensemble members)."""
    models = [model] + [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return [layer for m in models for layer in m.layers if layer.name == name]


def learning_rate_groups(model_config: ModelConfig, model: keras.Model) -> list[tuple[list, float]]:
    """(encoder variables, multiplier) for every encoder whose multiplier is not 1."""
    groups = []
    for modality in (m for m in MODALITIES if m in model_config.modalities):
        multiplier = getattr(model_config, f"{modality}_encoder").learning_rate_multiplier
        if multiplier != 1.0:
            variables = [v for layer in encoder_layers(model, encoder_name(modality)) for v in layer.weights]
            groups.append((variables, multiplier))
    return groups


def unfreeze_schedule(model_config: ModelConfig) -> dict[str, int]:
    """Encoder layer name -> the epoch it is unfrozen at, for encoders with a phase 1."""
    schedule = {}
    for modality in (m for m in MODALITIES if m in model_config.modalities):
        epoch = getattr(model_config, f"{modality}_encoder").unfreeze_at_epoch
        if epoch > 0:
            schedule[encoder_name(modality)] = epoch
    return schedule


def set_encoder_trainable(layer: keras.layers.Layer, trainable: bool) -> None:
    """Freezes or unfreezes an encoder; a backbone encoder unfreezes only its chosen top layers."""
    if hasattr(layer, "set_backbone_trainable"):
        layer.set_backbone_trainable(trainable)
    else:
        layer.trainable = trainable


# tf_keras's own record of every (nested) layer's ``trainable`` flag, which
# ``fit`` itself uses to restore the flags of compile time
# (training_utils.RespectCompiledTrainableState).
def trainable_state(model: keras.Model) -> dict:
    return model._get_trainable_state()


def set_trainable_state(model: keras.Model, state: dict) -> None:
    model._set_trainable_state(state)


def apply_phase(model: keras.Model, schedule: dict[str, int], epoch: int) -> frozenset[str]:
    """Sets each scheduled encoder frozen (epoch < its epoch) or unfrozen; returns the unfrozen names."""
    unfrozen = frozenset(name for name, at in schedule.items() if epoch >= at)
    for name in schedule:
        for layer in encoder_layers(model, name):
            set_encoder_trainable(layer, name in unfrozen)
    return unfrozen


def variables_ever_trained(model: keras.Model, schedule: dict[str, int]) -> list[tf.Variable]:
    """The model's trainable variables in every phase of ``schedule`` (in a stable order).

    The optimizer must be built on all of them before training: tf_keras
    optimizers create their slots (Adam's moments, EMA averages) once, on
    the variables of the first step, and reject others later.
    """
    state = trainable_state(model)
    variables, seen = [], set()
    try:
        for epoch in sorted({0, *schedule.values()}):
            apply_phase(model, schedule, epoch)
            for variable in model.trainable_variables:
                if id(variable) not in seen:
                    seen.add(id(variable))
                    variables.append(variable)
    finally:
        set_trainable_state(model, state)
    for variable in model.trainable_variables:  # the flags as built (no phase applied)
        if id(variable) not in seen:
            seen.add(id(variable))
            variables.append(variable)
    return variables
