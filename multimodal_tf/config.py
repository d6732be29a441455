"""Typed experiment configuration: the schema, loading and strict overrides.

Overrides are applied in a fixed order: dataclass defaults, then each YAML
file in turn, then ``--set a.b=c`` strings. Unknown keys are errors that name
the full key path, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any

import yaml

MODALITIES = ("image", "text", "audio")


@dataclasses.dataclass(frozen=True)
class ColumnsConfig:
    """Manifest column names."""

    id: str = "id"
    image: str = "image"
    text: str = "text"
    audio: str = "audio"
    label: str = "label"
    label_name: str = "label_name"  # optional column; names classes when present
    split: str = "split"


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Image preprocessing: decode, resize (keeping aspect) and scale to [0, 1]."""

    height: int = 32
    width: int = 32
    channels: int = 3
    resize: str = "pad"  # "pad" keeps the aspect ratio, "stretch" does not
    # Largest width x height decoded, read from the file header before
    # decoding (in the serving graph too): a 76 KB PNG can declare
    # 20000 x 20000 pixels and cost gigabytes to decode. 0 = no limit.
    max_pixels: int = 4096 * 4096


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Text preprocessing: normalise, tokenize, pad/truncate."""

    max_tokens: int = 16
    # "wordpiece": ids from the WordPiece vocabulary built at conversion.
    # "ngrams": hashed words + character n-grams (fastText-style); generalises
    # to unseen words of short texts (names, labels) where WordPiece cannot.
    tokenizer: str = "wordpiece"
    vocab_size: int = 2000  # wordpiece: target size for the vocabulary built at conversion
    ngram_range: tuple[int, int] = (2, 4)  # ngrams: character n-gram lengths (inclusive)
    hash_buckets: int = 20000  # ngrams: ids are 1..hash_buckets (0 = padding)
    lower_case: bool = True
    # "auto": a cell that names an existing *.txt file is read from it;
    # "inline": the cell is the text; "path": the cell is always a file path.
    source: str = "auto"


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """Audio preprocessing: WAV -> mono -> fixed duration -> log-mel."""

    sample_rate: int = 16000
    duration_seconds: float = 1.0
    frame_length: int = 400  # 25 ms at 16 kHz
    frame_step: int = 160  # 10 ms at 16 kHz
    fft_length: int = 512
    num_mel_bins: int = 40
    lower_edge_hertz: float = 20.0
    upper_edge_hertz: float = 7600.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
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
    batch_size: int = 64
    shuffle_buffer: int = 2048
    cache: bool = True


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """One modality encoder, chosen from the ENCODERS registry by ``name``."""

    name: str = ""
    width: int = 32  # filters / units of the first block
    depth: int = 2  # conv blocks or recurrent layers
    output_dim: int = 64
    dropout_rate: float = 0.1
    embedding_dim: int = 32  # text only
    bidirectional: bool = False  # recurrent encoders only
    augment: bool = False  # image/cnn only: random flips, shifts, zooms while training
    colour_bins: int = 0  # image/cnn only: levels per channel of a colour histogram beside the CNN (0 = none)
    linear: bool = False  # text/bow only: fastText's mean embedding, no max pool or projection
    checkpoint: str = ""  # local pretrained weights (never downloaded)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """How encoded modalities are combined (FUSIONS registry)."""

    name: str = "concat"
    hidden_dim: int = 64
    num_heads: int = 4
    rank: int = 4  # tensor fusion only
    combine: str = "mean"  # late fusion only: mean of probabilities | product (sum of logits)
    dropout_rate: float = 0.1


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Classifier head on top of the fused representation."""

    type: str = "multiclass"  # multiclass | binary | multilabel
    hidden_units: tuple[int, ...] = (64,)
    dropout_rate: float = 0.2


@dataclasses.dataclass(frozen=True)
class ModalityDropoutConfig:
    """Probability, per training example, of hiding each modality."""

    image: float = 0.0
    text: float = 0.0
    audio: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model: which modalities, their encoders, fusion and head."""

    modalities: tuple[str, ...] = MODALITIES
    image_encoder: EncoderConfig = EncoderConfig(name="image/cnn")
    text_encoder: EncoderConfig = EncoderConfig(name="text/lstm")
    audio_encoder: EncoderConfig = EncoderConfig(name="audio/cnn")
    fusion: FusionConfig = FusionConfig()
    head: HeadConfig = HeadConfig()
    modality_dropout: ModalityDropoutConfig = ModalityDropoutConfig()
    num_classes: int = 0  # 0: taken from the dataset metadata
    # Members of a deep ensemble (1 = a single model): independently
    # initialised copies of the whole model, each trained on its own loss,
    # whose probabilities are averaged (models.EnsembleModel).
    ensemble_size: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, strategy and outputs of ``mmtf train``."""

    output_dir: str = "runs/demo"
    epochs: int = 10
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | constant | plateau
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    # Polyak averaging of the weights (0 = off): validation, checkpoints and
    # the final model use the average, which varies less between epochs.
    ema_momentum: float = 0.0
    early_stopping_patience: int = 5  # 0 disables early stopping
    monitor: str = "val_accuracy"
    class_weights: str = "none"  # none | balanced
    strategy: str = "default"  # default | mirrored | multi_worker | parameter_server | tpu
    tpu: str = ""
    mixed_precision: str = ""  # "" | mixed_float16 | mixed_bfloat16
    jit_compile: bool = False
    seed: int = 42
    steps_per_execution: int = 1
    backup_dir: str = ""  # BackupAndRestore dir; empty: <output_dir>/backup
    scale_learning_rate: bool = False  # multiply LR by the number of replicas
    verbose: int = 1


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Where ``mmtf export`` writes versioned SavedModels."""

    base_path: str = "models"
    model_name: str = "mmtf"


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one experiment needs; saved next to checkpoints and exports."""

    name: str = "experiment"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    # Keras Tuner search space: hyperparameter name -> spec dict (see tuning.py).
    search_space: dict[str, Any] = dataclasses.field(default_factory=dict)


class ConfigError(ValueError):
    """Raised for unknown keys or values of the wrong type."""


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is tuple:
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Builds dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown config key {key_path!r}; known: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], key_path)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples become lists) for YAML/JSON."""

    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "search_space":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """Turns ``"a.b.c=value"`` into ``{"a": {"b": {"c": value}}}`` (YAML-typed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) is False and value is None:
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
) -> ExperimentConfig:
    """Resolves a config: defaults (or ``base``) -> YAML files -> overrides."""
    merged = to_dict(base or ExperimentConfig())
    for path in paths:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        try:
            from_dict(ExperimentConfig, _merge(merged, loaded))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        merged = _merge(merged, loaded)
    for text in overrides:
        merged = _merge(merged, parse_override(text))
    return from_dict(ExperimentConfig, merged)


def replace(config: ExperimentConfig, overrides: typing.Sequence[str]) -> ExperimentConfig:
    """Applies ``--set``-style overrides to an already resolved config."""
    return load((), overrides, base=config)


def save(config: ExperimentConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)


def fingerprint(value: Any) -> str:
    """Short stable hash of a (dataclass) value, for cache keys."""
    blob = json.dumps(to_dict(value) if dataclasses.is_dataclass(value) else value, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
