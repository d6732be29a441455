"""Typed experiment configuration: the schema, loading and strict overrides.

Overrides are applied in a fixed order: dataclass defaults, then each YAML
file in turn, then ``--set a.b=c`` strings. Unknown keys are errors that name
the full key path, so a typo never silently falls back to a default.

Encoders and fusion follow Model Garden's one-of pattern: each registered
family declares its own config dataclass next to its layer (a subclass of
:class:`EncoderConfig` or :class:`FusionConfig`), ``name`` selects the family
and only that family's fields are accepted. When a later layer (YAML file or
``--set``) switches a family, the fields the new family also takes carry
over and the others are dropped. Enum-like strings and ranges are checked
when a config is built, so a bad value fails at load, not when a layer is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, ClassVar

import yaml

from multimodal_tf.modality_config import MODALITIES, AudioConfig, ImageConfig, TextConfig  # noqa: F401
from multimodal_tf.objective_config import (  # noqa: F401  (part of this module's API)
    EXTRA_TARGET_TYPES,
    MULTICLASS,
    MULTILABEL,
    REGRESSION,
    TARGET_TYPES,
    AlignmentConfig,
    DistillConfig,
    TargetConfig,
    check_targets,
)
from multimodal_tf.registry import ENCODERS, FUSIONS, Registry
from multimodal_tf.typed_config import (  # noqa: F401  (ConfigError, from_dict, ... are part of this API)
    Checked,
    ConfigError,
    ConfigFieldError,
    MissingFileError,
    OneOf,
    default_family,
    family_config,
    from_dict,
    merge,
    merge_plain,
    option,
    to_dict,
)

HEAD_TYPES = ("multiclass", "binary", "multilabel")
STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server", "tpu")


@dataclasses.dataclass(frozen=True)
class ColumnsConfig(Checked):
    """Manifest column names."""

    id: str = "id"
    image: str = "image"
    text: str = "text"
    audio: str = "audio"
    label: str = "label"
    label_name: str = "label_name"  # optional column; names classes when present
    split: str = "split"


@dataclasses.dataclass(frozen=True)
class DataConfig(Checked):
    """Where the data is and how every modality is preprocessed."""

    manifest: str = ""
    # Converted TFRecords. Empty: a cache folder keyed by the manifest and the
    # conversion settings (see data.convert.default_tfrecord_dir).
    tfrecord_dir: str = ""
    columns: ColumnsConfig = ColumnsConfig()
    image: ImageConfig = ImageConfig()
    text: TextConfig = TextConfig()
    audio: AudioConfig = AudioConfig()
    num_shards: int = 4  # TFRecord shards per split
    # Share of the train split held out as "val" when the manifest has no
    # val/validation split (chosen by a hash of the id, so it is stable).
    validation_fraction: float = 0.1
    # How those examples are chosen: "hash" (each by its id's hash) or
    # "stratified" (per class, the same share of each class, picked by id
    # hash): small or skewed sets then get every class in validation.
    validation_split: str = option("hash", choices=("hash", "stratified"))
    # The conversion cache key covers every media file by size + mtime; true:
    # by a hash of its bytes (reads every file on each run).
    hash_media: bool = False
    batch_size: int = option(64, minimum=1)
    shuffle_buffer: int = 2048
    # Keep preprocessed examples after the first epoch: in memory when a
    # split's features fit cache_memory_mb, else in a temporary file.
    cache: bool = True
    cache_memory_mb: int = option(2048, minimum=0)
    # What the model predicts (multimodal_tf/targets.py); empty: one
    # multiclass target on columns.label, as before targets existed.
    targets: tuple[TargetConfig, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_targets(self.targets, self.columns.label)


@dataclasses.dataclass(frozen=True)
class EncoderConfig(OneOf):
    """What every encoder family's config has; ``name`` picks the family (ENCODERS).

    Each family subclasses this next to its layer (e.g. ``ImageCNNConfig`` in
    encoders/image.py) with the fields its layer takes.
    """

    registry: ClassVar[Registry] = ENCODERS
    families_package: ClassVar[str] = "multimodal_tf.encoders"
    # Fields of every family that are not layer arguments: the training
    # recipe (recipe.py, callbacks.FineTuningSchedule) reads the last two.
    common: ClassVar[tuple[str, ...]] = (
        "name",
        "checkpoint",
        "learning_rate_multiplier",
        "unfreeze_at_epoch",
    )

    # What the preprocessor hands this family's layer: one of
    # ``data.features.INPUT_KINDS[modality]``; "" = the modality's default
    # (image pixels, token ids of the data vocabulary, log-mel frames). A
    # family that needs another input (a waveform, its checkpoint's own
    # tokenizer) overrides it; data.features turns it into the feature spec
    # and data.preprocessing into the ops, so both stay in one place.
    input_kind: ClassVar[str] = ""

    checkpoint: str = ""  # local pretrained weights of this encoder (never downloaded)
    # This encoder's learning rate is train.learning_rate (and its schedule)
    # times this; 0 keeps its weights fixed. A real per-variable rate, not a
    # gradient scale (Adam would undo that): see recipe.make_optimizer.
    learning_rate_multiplier: float = option(1.0, minimum=0.0)
    # Two-phase fine-tuning: > 0 keeps the encoder frozen for the epochs
    # before this one (the rest of the model trains), then unfreezes it
    # (a backbone family: its top ``trainable_layers``); 0 = no phase 1.
    unfreeze_at_epoch: int = option(0, minimum=0)

    def check_data(self, data: DataConfig) -> None:
        """Raises ConfigFieldError where ``data``'s preprocessing cannot feed this family.

        Called when an :class:`ExperimentConfig` is built, for the encoders of
        the modalities the model uses, so that a mismatch (e.g. a pretrained
        audio model's sample rate) fails at load. Nothing to check by default.
        """


@dataclasses.dataclass(frozen=True)
class FusionConfig(OneOf):
    """What every fusion family's config has; ``name`` picks the family (FUSIONS).

    Each family subclasses this next to its layer (e.g. ``LateFusionConfig``
    in fusion/late.py) with the fields its layer takes.
    """

    registry: ClassVar[Registry] = FUSIONS
    families_package: ClassVar[str] = "multimodal_tf.fusion"


@dataclasses.dataclass(frozen=True)
class HeadConfig(Checked):
    """Classifier head on top of the fused representation."""

    type: str = option("multiclass", choices=HEAD_TYPES)
    hidden_units: tuple[int, ...] = (64,)
    dropout_rate: float = option(0.2, minimum=0.0)


@dataclasses.dataclass(frozen=True)
class ModalityDropoutConfig(Checked):
    """Probability, per training example, of hiding each modality."""

    image: float = option(0.0, minimum=0.0)
    text: float = option(0.0, minimum=0.0)
    audio: float = option(0.0, minimum=0.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Checked):
    """The model: which modalities, their encoders, fusion and head."""

    modalities: tuple[str, ...] = MODALITIES
    image_encoder: EncoderConfig = default_family(EncoderConfig, "image/cnn")
    text_encoder: EncoderConfig = default_family(EncoderConfig, "text/lstm")
    audio_encoder: EncoderConfig = default_family(EncoderConfig, "audio/cnn")
    fusion: FusionConfig = default_family(FusionConfig, "concat")
    head: HeadConfig = HeadConfig()
    modality_dropout: ModalityDropoutConfig = ModalityDropoutConfig()
    num_classes: int = option(0, minimum=0)  # 0: taken from the dataset metadata
    # Members of a deep ensemble (1 = a single model): independently
    # initialised copies of the whole model, each trained on its own loss,
    # whose probabilities are averaged (models.EnsembleModel).
    ensemble_size: int = option(1, minimum=1)
    alignment: AlignmentConfig = AlignmentConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        outside = [m for m in self.alignment.modalities if m not in self.modalities]
        if outside:
            raise ConfigFieldError("alignment.pairs", f"modalities {outside} are not in model.modalities")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or unknown or len(set(self.modalities)) != len(self.modalities):
            raise ConfigFieldError(
                "modalities", f"expected distinct names from {list(MODALITIES)}, got {list(self.modalities)}"
            )
        for modality in MODALITIES:
            name = getattr(self, f"{modality}_encoder").name
            if not name.startswith(f"{modality}/"):
                raise ConfigFieldError(
                    f"{modality}_encoder.name",
                    f"must name a '{modality}/...' encoder, got {name!r}",
                )


@dataclasses.dataclass(frozen=True)
class TrainConfig(Checked):
    """Optimisation, strategy and outputs of ``mmtf train``."""

    output_dir: str = "runs/demo"
    epochs: int = option(10, minimum=1)
    learning_rate: float = option(1e-3, minimum=0.0)
    lr_schedule: str = option("cosine", choices=("cosine", "constant", "plateau"))
    optimizer: str = option("adam", choices=("adam", "adamw", "sgd"))
    weight_decay: float = option(0.0, minimum=0.0)
    # Polyak averaging of the weights (0 = off): validation, checkpoints and
    # the final model use the average, which varies less between epochs.
    ema_momentum: float = option(0.0, minimum=0.0)
    early_stopping_patience: int = option(5, minimum=0)  # 0 disables early stopping
    monitor: str = "val_accuracy"
    class_weights: str = option("none", choices=("none", "balanced"))
    strategy: str = option("default", choices=STRATEGIES)
    tpu: str = ""
    mixed_precision: str = option("", choices=("", "mixed_float16", "mixed_bfloat16"))
    jit_compile: bool = False
    seed: int = 42
    steps_per_execution: int = option(1, minimum=1)
    backup_dir: str = ""  # BackupAndRestore dir; empty: <output_dir>/backup
    scale_learning_rate: bool = False  # multiply LR by the number of replicas
    verbose: int = 1
    # "temperature": after training, one temperature fitted on the val split
    # (min NLL) scales the logits of the best weights; evaluation and every
    # export then return calibrated probabilities (calibration.py).
    calibration: str = option("none", choices=("none", "temperature"))


@dataclasses.dataclass(frozen=True)
class ExportConfig(Checked):
    """Where ``mmtf export`` writes versioned SavedModels."""

    base_path: str = "models"
    model_name: str = "mmtf"


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Checked):
    """Everything one experiment needs; saved next to checkpoints and exports."""

    name: str = "experiment"
    data: DataConfig = DataConfig()
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    distill: DistillConfig = DistillConfig()
    # Keras Tuner search space: hyperparameter name -> spec dict (see tuning/space.py).
    search_space: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.targets and self.model.head.type != "multiclass":
            raise ConfigFieldError("model.head.type", "with data.targets each target sets its own type")
        for modality in self.model.modalities:
            try:
                getattr(self.model, f"{modality}_encoder").check_data(self.data)
            except ConfigFieldError as e:
                raise ConfigFieldError(f"model.{modality}_encoder.{e.key}", e.reason) from None


def parse_override(text: str) -> dict:
    """Turns ``"a.b.c=value"`` into ``{"a": {"b": {"c": value}}}`` (YAML-typed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if value is None:
        value = ""
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load(
    paths: typing.Sequence[str | Path] = (),
    overrides: typing.Sequence[str] = (),
    base: ExperimentConfig | None = None,
    strict: bool = True,
) -> ExperimentConfig:
    """Resolves a config: defaults (or ``base``) -> YAML files -> overrides.

    Each YAML file is one layer, and all ``overrides`` together are the last
    one (so ``--set model.fusion.rank=8 --set model.fusion.name=tensor``
    works in either order).

    Args:
        paths: YAML files, applied in order.
        overrides: ``key.path=value`` strings.
        base: the config to start from instead of the defaults.
        strict: False skips a field (in a file or an override) that the
            chosen encoder or fusion family lacks but another family takes:
            for search spaces over several families (see ``replace``) and
            for configs saved before each family had its own config, which
            held every family's fields.

    Raises:
        ConfigError: an unknown key or a bad value, naming its full key path
            (and the YAML file it came from).
    """
    merged = to_dict(base) if base is not None else {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        try:
            layered = merge(merged, loaded, ExperimentConfig, strict)
            from_dict(ExperimentConfig, layered)
        except MissingFileError:
            pass  # checked on the resolved config below: a later layer may name another file
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        merged = layered
    update: dict = {}
    for text in overrides:
        update = merge_plain(update, parse_override(text))
    return from_dict(ExperimentConfig, merge(merged, update, ExperimentConfig, strict))


def replace(
    config: ExperimentConfig, overrides: typing.Sequence[str], strict: bool = True
) -> ExperimentConfig:
    """Applies ``--set``-style overrides to an already resolved config.

    ``strict=False`` is for a search space over several families (tuning):
    ``model.fusion.dropout_rate`` is then skipped for a trial that picked
    ``concat``, which has no dropout, instead of failing the trial. A key
    that no family takes is still an error.
    """
    return load((), overrides, base=config, strict=strict)


def save(config: ExperimentConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)


def fingerprint(value: Any) -> str:
    """Short stable hash of a (dataclass) value, for cache keys."""
    blob = json.dumps(to_dict(value) if dataclasses.is_dataclass(value) else value, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
