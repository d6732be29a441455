"""The Keras Tuner HyperModel: hyperparameters -> config -> the training recipe."""

from __future__ import annotations

from multimodal_tf import recipe
from multimodal_tf.compat import import_keras_tuner
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.tuning.space import apply_values, declare

kt = import_keras_tuner()


class MultimodalHyperModel(kt.HyperModel):
    """Maps hyperparameters to config overrides and trains with the recipe of ``mmtf train``.

    Each trial's model, datasets and recipe callbacks (weight-average swap,
    early stopping that restores the best weights, plateau schedule) come
    from :mod:`multimodal_tf.recipe`, so a trial is scored the way
    ``mmtf train`` would train its config.

    Args:
        config: the base experiment (data, model and training defaults).
        metadata: the converted dataset's metadata (classes, vocabulary, counts).
        space: the search space (see :mod:`multimodal_tf.tuning.space`).
    """

    def __init__(self, config: ExperimentConfig, metadata: DatasetMetadata, space: dict, **kwargs):
        super().__init__(name=config.name, tunable=True, **kwargs)
        self.config = config
        self.metadata = metadata
        self.space = space

    def trial_config(self, hp) -> ExperimentConfig:
        values = {name: declare(hp, name, spec) for name, spec in self.space.items()}
        return apply_values(self.config, self.space, values)

    def build(self, hp):
        config = self.trial_config(hp)
        recipe.set_seed(config.train.seed, deterministic=not config.train.jit_compile)
        return recipe.compile_model(config, self.metadata)

    def fit(self, hp, model, *args, **kwargs):
        config = self.trial_config(hp)
        # Mirrored/TPU trials: Keras splits each global batch over the replicas.
        train, val, fit_steps = recipe.datasets_for(config, self.metadata)
        callbacks = recipe.callbacks_for(config, between=kwargs.pop("callbacks", None) or [])
        kwargs.setdefault("epochs", config.train.epochs)
        return model.fit(train, validation_data=val, callbacks=callbacks, **fit_steps, **kwargs)
