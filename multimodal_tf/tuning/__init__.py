"""``mmtf tune``: Keras Tuner over experiment configs.

* :mod:`~multimodal_tf.tuning.space`: hyperparameter specs -> config overrides.
* :mod:`~multimodal_tf.tuning.hypermodel`: each trial's config trained with
  the recipe of ``mmtf train`` (:mod:`multimodal_tf.recipe`).
* :mod:`~multimodal_tf.tuning.tuners`: random / bayesian / hyperband tuners
  and :func:`tune`, which runs or resumes a search.
* :mod:`~multimodal_tf.tuning.reports`: trials.csv / trials.md,
  objective.png and best_config.yaml.
* :mod:`~multimodal_tf.tuning.chief`: distributed tuning's chief loop.

Distributed tuning runs Keras Tuner's chief/worker mode from the
``KERASTUNER_*`` variables that ``mmtf launch --tuner-workers N`` sets; each
trial then trains with a single-worker strategy (default, mirrored or tpu).
"""

from multimodal_tf.tuning.hypermodel import MultimodalHyperModel, kt
from multimodal_tf.tuning.reports import TuneResult, trial_rows, write_reports
from multimodal_tf.tuning.space import apply_values, declare, default_search_space
from multimodal_tf.tuning.tuners import TUNERS, make_tuner, objective_for, tune

__all__ = [
    "TUNERS",
    "MultimodalHyperModel",
    "TuneResult",
    "apply_values",
    "declare",
    "default_search_space",
    "kt",
    "make_tuner",
    "objective_for",
    "trial_rows",
    "tune",
    "write_reports",
]
