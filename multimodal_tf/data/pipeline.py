"""``make_dataset``: TFRecord shards -> batched model features, all in tf.data."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from multimodal_tf import targets as targets_lib
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data import features
from multimodal_tf.data.cache import default_tfrecord_dir, prepare_data
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.data.text import clean_texts

AUTOTUNE = tf.data.AUTOTUNE
# Records are parsed and preprocessed in blocks: the STFT and the tokenizer
# are vectorised, so a block costs far less than as many single examples.
PREPROCESS_BLOCK = 128
FEATURE_CACHE_ENV = "MMTF_FEATURE_CACHE_DIR"


def shard_files(
    files: list[str],
    input_context: tf.distribute.InputContext | None,
    num_examples: int | None = None,
):
    """Per-worker file list and whether data-level sharding is still needed.

    With at least as many files as input pipelines each worker reads its own
    files (conversion never writes an empty shard); otherwise every worker
    reads all files and keeps every N-th example. A split with fewer
    examples than input pipelines is not sharded at all — every worker reads
    all of it — because a worker left without data ends its (repeated)
    dataset at once while the others wait for it in a collective: the job
    would hang.
    """
    if input_context is None or input_context.num_input_pipelines <= 1:
        return files, False
    count, index = input_context.num_input_pipelines, input_context.input_pipeline_id
    if num_examples is not None and num_examples < count:
        logging.warning(
            "%d examples for %d input pipelines: every worker reads the whole split (no sharding)",
            num_examples,
            count,
        )
        return files, False
    if len(files) >= count:
        return files[index::count], False
    return files, True


def feature_bytes(element_spec) -> int:
    """Bytes of one element's fixed-shape numeric tensors (strings, e.g. ids, not counted)."""
    specs = [s for s in tf.nest.flatten(element_spec) if s.dtype != tf.string]
    return sum(s.shape.num_elements() * s.dtype.size for s in specs if s.shape.is_fully_defined())


def cache_features(dataset: tf.data.Dataset, budget_mb: int, num_examples: int, split: str):
    """Caches preprocessed examples in memory if the split fits ``budget_mb``, else on disk.

    The disk cache is a temporary folder (under ``$MMTF_FEATURE_CACHE_DIR``
    when set) removed when the process exits: the first epoch writes it,
    later epochs read it instead of decoding again.
    """
    size = feature_bytes(dataset.element_spec) * num_examples
    if size <= budget_mb * 2**20:
        return dataset.cache()
    folder = tempfile.mkdtemp(prefix=f"mmtf-features-{split}-", dir=os.environ.get(FEATURE_CACHE_ENV))
    atexit.register(shutil.rmtree, folder, True)
    logging.info("%s features (~%d MB) exceed data.cache_memory_mb: caching in %s", split, size >> 20, folder)
    return dataset.cache(os.path.join(folder, "features"))


# Over 60 lines only through its docstring (13 lines) and one argument per line.
def _converted_dir(config: ExperimentConfig, metadata: DatasetMetadata, directory: Path) -> Path:
    """``directory`` once it holds ``metadata``'s shards: converting the manifest again if it does not."""
    shards = [name for names in metadata.shards.values() for name in names]
    if all((directory / name).exists() for name in shards):
        return directory
    if not config.data.manifest:
        raise FileNotFoundError(
            f"TFRecords of this run are missing from {directory} and data.manifest is empty, "
            "so they cannot be converted again; set data.tfrecord_dir or data.manifest"
        )
    converted = prepare_data(config.data, progress=False)
    directory = Path(default_tfrecord_dir(config.data))
    if converted.label_names != metadata.label_names:
        raise ValueError(
            f"{config.data.manifest} now converts to labels {converted.label_names}, "
            f"the run was trained on {metadata.label_names}"
        )
    return directory


def make_dataset(
    config: ExperimentConfig,
    split: str,
    input_context: tf.distribute.InputContext | None = None,
    training: bool | None = None,
    metadata: DatasetMetadata | None = None,
    batch_size: int | None = None,
    drop_remainder: bool = False,
    with_ids: bool = False,
    preprocessor: Preprocessor | None = None,
    with_targets: bool = False,
) -> tf.data.Dataset:
    """Batched ``(features, label)`` (or ``(features, label, id)``) for one split.

    Args:
        config: experiment config (data settings and model modalities).
        split: ``train``, ``val`` or ``test``.
        input_context: from ``distribute_datasets_from_function``; shards the
            input and turns the global batch size into a per-replica one.
        training: shuffle and repeat-friendly ordering; default: split == train.
        metadata: conversion metadata; read from the TFRecord folder if None.
        batch_size: global batch size; default ``config.data.batch_size``.
        drop_remainder: static batch shapes (TPU).
        with_ids: also yield the example ids (for prediction files).
        preprocessor: raw records -> model features (``parse_examples`` and
            a call); default the config's ``Preprocessor``. The robustness
            report passes one that degrades the decoded inputs.
        with_targets: with ``data.targets``, the label is a dict: the
            primary target's int label and each extra target's packed
            ``[values..., present]`` (``targets.packed_labels``).
    """
    data = config.data
    directory = Path(default_tfrecord_dir(data))
    if metadata is not None:
        # A run's saved metadata, read from another working directory (the cache
        # is relative) or after the cache was cleared: convert again rather than
        # fail later inside the iterator with a bare NotFoundError.
        directory = _converted_dir(config, metadata, directory)
    metadata = metadata or DatasetMetadata.load(directory)
    if split not in metadata.shards:
        raise ValueError(f"split {split!r} not in {directory}; have {sorted(metadata.shards)}")
    training = split == "train" if training is None else training
    batch_size = batch_size or data.batch_size
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    files, shard_data = shard_files(
        [str(directory / f) for f in metadata.shards[split]],
        input_context,
        metadata.counts[split]["examples"],
    )
    preprocessor = preprocessor or Preprocessor(data, metadata.vocabulary, config.model)

    with_targets = with_targets and bool(data.targets)
    target_spec = targets_lib.feature_spec(data, targets_lib.sizes(data, metadata)) if with_targets else {}

    def preprocess(serialized):
        raw = preprocessor.parse_examples(serialized)
        model_features = preprocessor(raw)
        label = raw[features.LABEL]
        if with_targets:
            label = targets_lib.packed_labels(data, tf.io.parse_example(serialized, target_spec), label)
        return model_features, label, raw[features.ID]

    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training:
        dataset = dataset.shuffle(len(files), seed=config.train.seed)
    dataset = dataset.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 4),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,  # reproducible runs with a fixed seed
    )
    if shard_data:
        dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    dataset = dataset.batch(PREPROCESS_BLOCK).map(preprocess, num_parallel_calls=AUTOTUNE).unbatch()
    if data.cache:
        dataset = cache_features(dataset, data.cache_memory_mb, metadata.counts[split]["examples"], split)
    if training:
        dataset = dataset.shuffle(data.shuffle_buffer, seed=config.train.seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if not with_ids:
        dataset = dataset.map(lambda x, y, _: (x, y))
    return dataset.prefetch(AUTOTUNE)


def split_texts(config: ExperimentConfig, split: str, metadata: DatasetMetadata | None = None) -> list[bytes]:
    """Every text of ``split`` (empty: absent) as the model's ``text_strings`` input sees it.

    Reads only the text feature (no image or audio is decoded), cut and
    checked as :class:`Preprocessor` does.
    """
    directory = Path(default_tfrecord_dir(config.data))
    metadata = metadata or DatasetMetadata.load(directory)
    if split not in metadata.shards:
        raise ValueError(f"split {split!r} not in {directory}; have {sorted(metadata.shards)}")
    spec = {features.TEXT: tf.io.FixedLenFeature([], tf.string, default_value="")}
    dataset = (
        tf.data.TFRecordDataset([str(directory / f) for f in metadata.shards[split]])
        .batch(PREPROCESS_BLOCK)
        .map(lambda s: clean_texts(tf.io.parse_example(s, spec)[features.TEXT], config.data.text))
    )
    return [text for batch in dataset for text in batch.numpy().tolist()]
