"""``mmtf data convert``: manifest -> sharded TFRecords of raw-bytes ``tf.Example``.

Writes are atomic (each shard goes to a temporary name and is renamed when
complete; ``metadata.json`` is written last), and a finished conversion with
the same inputs and settings is not redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import tensorflow as tf
from tqdm import tqdm

from multimodal_tf import targets as targets_lib
from multimodal_tf.config import DataConfig, fingerprint
from multimodal_tf.data import audio_io, features
from multimodal_tf.data import manifest as manifest_lib
from multimodal_tf.data.metadata import METADATA_FILE, DatasetMetadata
from multimodal_tf.data.text import build_vocabulary
from multimodal_tf.data.validate import check_record

FORMAT_VERSION = 1
DEAD_LETTER_FILE = "dead_letter.jsonl"


class ConversionError(ValueError):
    """Bad records with ``on_error='fail'``; the message lists them."""


def media_fingerprint(records, content: bool = False) -> str:
    """Hash of every media file a manifest names: size and mtime, or the bytes.

    Size + mtime catches a file replaced under the same path at the cost of a
    ``stat`` per file; ``content=True`` (``data.hash_media``) reads every byte,
    for file systems whose mtimes cannot be trusted. A missing file hashes
    as missing (validation reports it).
    """
    digest = hashlib.sha256()
    for record in records:
        for path in (record.image, record.audio, record.text_path):
            if not path:
                continue
            digest.update(path.encode("utf-8", "surrogateescape"))
            try:
                if content:
                    digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
                else:
                    stat = os.stat(path)
                    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(b"missing")
    return digest.hexdigest()


def source_fingerprint(manifest_path: Path, config: DataConfig) -> str:
    """Hash of the manifest, its media files and every setting that changes the conversion."""
    manifest_path = Path(manifest_path)
    digest = hashlib.sha256(manifest_path.read_bytes())
    settings = {
        "format": FORMAT_VERSION,
        "columns": fingerprint(config.columns),
        "sample_rate": config.audio.sample_rate,
        "audio_reader": audio_io.resolve_backend(config.audio.reader),
        "text": [config.text.vocab_size, config.text.lower_case, config.text.source],
        "num_shards": config.num_shards,
        "validation_fraction": config.validation_fraction,
    }
    if config.validation_split != "hash":  # the key of earlier conversions stays the same
        settings["validation_split"] = config.validation_split
    if config.targets:  # likewise
        settings["targets"] = [fingerprint(t) for t in config.targets]
    digest.update(repr(sorted(settings.items())).encode())
    records = manifest_lib.read_manifest(manifest_path, config).records
    digest.update(media_fingerprint(records, content=config.hash_media).encode())
    return digest.hexdigest()[:16]


def _in_validation(record_id: str, fraction: float) -> bool:
    bucket = int(hashlib.md5(record_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def has_val_split(records) -> bool:
    return any(manifest_lib.SPLIT_ALIASES.get(r.split) == manifest_lib.VAL for r in records)


def split_of_train(record_id: str, has_val: bool, fraction: float) -> str:
    """Where a good train record goes: val for a stable share when there is no val split."""
    held_out = not has_val and _in_validation(record_id, fraction)
    return manifest_lib.VAL if held_out else manifest_lib.TRAIN


def _stratified_validation(records, fraction: float) -> set[str]:
    """Ids of ``round(fraction * n_c)`` train records of each class c (by id hash; none of a singleton)."""
    by_label: dict[str, list] = {}
    for record in records:
        by_label.setdefault(record.label, []).append(record)
    chosen = set()
    for members in by_label.values():
        members.sort(key=lambda r: hashlib.md5(r.id.encode()).hexdigest())
        count = min(len(members) - 1, max(1, round(fraction * len(members)))) if fraction > 0 else 0
        chosen.update(r.id for r in members[:count])
    return chosen


def stable_order(records) -> list:
    """``records`` in a stable shuffled order (by id hash), so shards and batches mix labels."""
    return sorted(records, key=lambda r: hashlib.md5(r.id.encode()).hexdigest())


def _assign_splits(records, fraction: float, method: str = "hash") -> dict[str, list]:
    has_val = has_val_split(records)
    splits: dict[str, list] = {manifest_lib.TRAIN: [], manifest_lib.VAL: [], manifest_lib.TEST: []}
    stratified = set()
    if method == "stratified" and not has_val:
        train = [r for r in records if manifest_lib.SPLIT_ALIASES[r.split] == manifest_lib.TRAIN]
        stratified = _stratified_validation(train, fraction)
    for record in records:
        split = manifest_lib.SPLIT_ALIASES[record.split]
        if split == manifest_lib.TRAIN and not has_val:
            held_out = (
                record.id in stratified if method == "stratified" else _in_validation(record.id, fraction)
            )
            split = manifest_lib.VAL if held_out else split
        splits[split].append(record)
    return splits


def make_example(record, label: int, config: DataConfig, vocabularies=None) -> tf.train.Example:
    """One record as a ``tf.Example``; ``vocabularies``: multilabel target -> labels (data.targets)."""

    def bytes_feature(value: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def int_feature(value: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    image = Path(record.image).read_bytes() if record.image else b""
    audio = (
        audio_io.to_wav16(record.audio, config.audio.sample_rate, config.audio.reader)
        if record.audio
        else b""
    )
    values = {features.IMAGE: image, features.TEXT: record.text, features.AUDIO: audio}
    feature = {features.ID: bytes_feature(record.id.encode()), features.LABEL: int_feature(label)}
    for modality, value in values.items():
        feature[modality] = bytes_feature(value)
        feature[features.presence_name(modality)] = int_feature(int(bool(value)))
    if config.targets:
        feature.update(targets_lib.example_features(record, config, vocabularies or {}))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def shard_count(num_examples: int, num_shards: int) -> int:
    return max(1, min(num_shards, num_examples))


def _write_shards(out_dir: Path, split: str, examples: Iterable[bytes], count: int) -> list[str]:
    """Streams serialized examples round-robin into ``count`` shards.

    Example ``i`` goes to shard ``i % count`` as it arrives, so memory holds
    one example and the writers' buffers, never a split.
    """
    names = [f"{split}-{index:05d}-of-{count:05d}.tfrecord" for index in range(count)]
    temporary = [out_dir / f".{name}.tmp{os.getpid()}" for name in names]
    writers = [tf.io.TFRecordWriter(str(path)) for path in temporary]
    try:
        for index, serialized in enumerate(examples):
            writers[index % count].write(serialized)
    finally:
        for writer in writers:
            writer.close()
    for path, name in zip(temporary, names, strict=False):
        os.replace(path, out_dir / name)  # a shard is visible only when complete
    return names


def write_dead_letter(out_dir: Path, problems) -> None:
    """``dead_letter.jsonl``: one line per problem of a skipped record (id, row, field, reason)."""
    lines = [json.dumps(dataclasses.asdict(p), ensure_ascii=False) for p in problems]
    (out_dir / DEAD_LETTER_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _check_records(records, label_names: list[str], config: DataConfig, progress: bool):
    """(records without problems, every problem found)."""
    good, problems = [], []
    for record in tqdm(records, desc="checking", disable=not progress, file=sys.stderr, mininterval=2):
        found = check_record(record, label_names, config)
        problems.extend(found)
        if not found:
            good.append(record)
    return good, problems


def _split_counts(records, label_names: list[str]) -> dict:
    """Examples, examples per class and per present modality of one split."""
    return {
        "examples": len(records),
        "labels": {
            name: sum(manifest_lib.label_id(r, label_names) == i for r in records)
            for i, name in enumerate(label_names)
        },
        "present": {m: sum(bool(getattr(r, m)) for r in records) for m in ("image", "text", "audio")},
    }


def up_to_date(out_dir: Path, source: dict) -> DatasetMetadata | None:
    """The metadata of a complete conversion of ``source`` in ``out_dir``, else None."""
    if not (out_dir / METADATA_FILE).exists():
        return None
    existing = DatasetMetadata.load(out_dir)
    complete = all((out_dir / s).exists() for names in existing.shards.values() for s in names)
    return existing if existing.source.get("fingerprint") == source["fingerprint"] and complete else None


def failure_message(manifest_path: Path, problems) -> str:
    listing = "\n".join(f"  {p}" for p in problems[:50])
    return f"{len(problems)} problems in {manifest_path} (use --on-error skip):\n{listing}"


def finish(
    out_dir: Path, label_names, vocabulary, counts, shards, config, source, targets=None
) -> DatasetMetadata:
    """Writes ``metadata.json`` (last: it marks the conversion complete) and ``vocab.txt``."""
    metadata = DatasetMetadata(
        targets=targets or {},
        label_names=label_names,
        vocabulary=vocabulary,
        counts=counts,
        shards=shards,
        sample_rate=config.audio.sample_rate,
        source=source,
    )
    (out_dir / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    metadata.save(out_dir)
    return metadata


def convert(
    manifest_path: str | Path,
    out_dir: str | Path,
    config: DataConfig,
    on_error: str = "fail",
    progress: bool = True,
    force: bool = False,
) -> DatasetMetadata:
    """Converts a manifest; returns the metadata (existing one if up to date).

    Memory holds the manifest's rows (paths and texts), not the media: each
    example is read, encoded and written to its shard in turn.
    """
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    source = {
        "manifest": str(manifest_path.resolve()),
        "fingerprint": source_fingerprint(manifest_path, config),
    }
    if not force and (existing := up_to_date(out_dir, source)):
        return existing
    manifest = manifest_lib.read_manifest(manifest_path, config)
    label_names = manifest_lib.label_names_of(manifest)
    good, problems = _check_records(manifest.records, label_names, config, progress)
    if problems and on_error == "fail":
        raise ConversionError(failure_message(manifest_path, problems))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METADATA_FILE).unlink(missing_ok=True)  # stale until rewritten
    splits = _assign_splits(good, config.validation_fraction, config.validation_split)
    splits = {split: stable_order(records) for split, records in splits.items()}
    vocabulary = build_vocabulary([r.text.decode("utf-8") for r in splits[manifest_lib.TRAIN]], config.text)
    vocabularies = targets_lib.label_vocabularies(splits[manifest_lib.TRAIN], config)
    shards, counts = {}, {}
    bar = tqdm(total=len(good), desc="converting", disable=not progress, file=sys.stderr, mininterval=2)

    def serialized(records):
        for record in records:
            label = manifest_lib.label_id(record, label_names)
            yield make_example(record, label, config, vocabularies).SerializeToString()
            bar.update()

    for split, records in splits.items():
        if not records:
            continue
        count = shard_count(len(records), config.num_shards)
        shards[split] = _write_shards(out_dir, split, serialized(records), count)
        counts[split] = _split_counts(records, label_names)
    bar.close()
    write_dead_letter(out_dir, problems)
    counts["skipped"] = sorted({p.record_id for p in problems})
    targets = targets_lib.metadata_entry(config, vocabularies, splits)
    return finish(out_dir, label_names, vocabulary, counts, shards, config, source, targets)
