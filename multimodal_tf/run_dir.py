"""The run directory: its file names and how to read a run back.

``mmtf train`` writes, and ``mmtf evaluate`` / ``mmtf export`` read:
``config.yaml`` (resolved), ``metadata.json`` (label names, vocabulary),
``checkpoints/{best,last}.weights.h5``, ``history.{json,csv}``,
``learning_curves.png``, ``logs/`` (TensorBoard), ``metrics.json`` and, with
``train.calibration: temperature``, ``calibration.json``; a distilled
student (``mmtf distill``) also ``teacher_targets.npz`` and ``teacher.json``.
"""

from __future__ import annotations

from pathlib import Path

from multimodal_tf import config as config_lib
from multimodal_tf import targets as targets_lib
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.data.text import vocabulary_size
from multimodal_tf.models import build_model

CONFIG_FILE, METADATA_FILE = "config.yaml", "metadata.json"
BEST_WEIGHTS, LAST_WEIGHTS = "checkpoints/best.weights.h5", "checkpoints/last.weights.h5"
HISTORY_JSON, HISTORY_CSV = "history.json", "history.csv"
CURVES_FILE, LOGS_DIR, METRICS_FILE = "learning_curves.png", "logs", "metrics.json"
CALIBRATION_FILE = "calibration.json"  # train.calibration: temperature, val NLL/ECE before and after
# mmtf distill: the teacher's train/val probabilities by example id, and where they came from.
TEACHER_TARGETS_FILE, TEACHER_INFO_FILE = "teacher_targets.npz", "teacher.json"


def load_run(run_dir: str | Path) -> tuple[ExperimentConfig, DatasetMetadata]:
    """Resolved config and dataset metadata saved with a run."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    # strict=False: runs saved before per-family configs hold every family's fields.
    config = config_lib.load([run_dir / CONFIG_FILE], strict=False)
    return config, DatasetMetadata.load(run_dir)


def load_trained_model(run_dir: str | Path, weights: str = BEST_WEIGHTS):
    """Rebuilds a run's model with ``build_model`` and loads its weights.

    Returns:
        ``(config, metadata, model)``; the model has the ``weights`` file's
        values, or the last weights when that file is missing.
    """
    config, metadata = load_run(run_dir)
    sizes = targets_lib.sizes(config.data, metadata) if config.data.targets else None
    model = build_model(
        config,
        config.model.num_classes or metadata.num_classes,
        vocabulary_size(config.data.text, metadata.vocabulary),
        target_sizes=sizes,
    )
    path = Path(run_dir) / weights
    if not path.exists():
        path = Path(run_dir) / LAST_WEIGHTS
    model.load_weights(str(path))
    return config, metadata, model
