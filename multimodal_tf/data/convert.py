"""``mmtf data convert``: manifest -> sharded TFRecords of raw-bytes ``tf.Example``.

Writes are atomic (each shard goes to a temporary name and is renamed when
complete; ``metadata.json`` is written last), and a finished conversion with
the same inputs and settings is not redone.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import tensorflow as tf
from tqdm import tqdm

from multimodal_tf.config import DataConfig, fingerprint
from multimodal_tf.data import audio_io, features
from multimodal_tf.data import manifest as manifest_lib
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.data.text import build_vocabulary
from multimodal_tf.data.validate import check_record

FORMAT_VERSION = 1


class ConversionError(ValueError):
    """Bad records with ``on_error='fail'``; the message lists them."""


def source_fingerprint(manifest_path: Path, config: DataConfig) -> str:
    """Hash of the manifest's bytes and every setting that changes the conversion."""
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
    digest.update(repr(sorted(settings.items())).encode())
    return digest.hexdigest()[:16]


def _in_validation(record_id: str, fraction: float) -> bool:
    bucket = int(hashlib.md5(record_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


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


def _assign_splits(records, fraction: float, method: str = "hash") -> dict[str, list]:
    has_val = any(manifest_lib.SPLIT_ALIASES[r.split] == manifest_lib.VAL for r in records)
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


def _example(record, label: int, config: DataConfig) -> tf.train.Example:
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
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _write_shards(out_dir: Path, split: str, examples: list[bytes], num_shards: int) -> list[str]:
    count = max(1, min(num_shards, len(examples)))
    names = []
    for index in range(count):
        name = f"{split}-{index:05d}-of-{count:05d}.tfrecord"
        tmp = out_dir / f".{name}.tmp{os.getpid()}"
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for serialized in examples[index::count]:
                writer.write(serialized)
        os.replace(tmp, out_dir / name)  # a shard is visible only when complete
        names.append(name)
    return names


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


def convert(
    manifest_path: str | Path,
    out_dir: str | Path,
    config: DataConfig,
    on_error: str = "fail",
    progress: bool = True,
    force: bool = False,
) -> DatasetMetadata:
    """Converts a manifest; returns the metadata (existing one if up to date)."""
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    source = {
        "manifest": str(manifest_path.resolve()),
        "fingerprint": source_fingerprint(manifest_path, config),
    }
    if not force and (out_dir / "metadata.json").exists():
        existing = DatasetMetadata.load(out_dir)
        complete = all((out_dir / s).exists() for names in existing.shards.values() for s in names)
        if existing.source.get("fingerprint") == source["fingerprint"] and complete:
            return existing
    manifest = manifest_lib.read_manifest(manifest_path, config)
    label_names = manifest_lib.label_names_of(manifest)
    good, problems = _check_records(manifest.records, label_names, config, progress)
    if problems and on_error == "fail":
        listing = "\n".join(f"  {p}" for p in problems[:50])
        raise ConversionError(
            f"{len(problems)} problems in {manifest_path} (use --on-error skip):\n{listing}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metadata.json").unlink(missing_ok=True)  # stale until rewritten
    splits = _assign_splits(good, config.validation_fraction, config.validation_split)
    # A stable shuffle (by id hash) so shards and batches mix labels.
    for records in splits.values():
        records.sort(key=lambda r: hashlib.md5(r.id.encode()).hexdigest())
    vocabulary = build_vocabulary([r.text.decode("utf-8") for r in splits[manifest_lib.TRAIN]], config.text)
    shards, counts = {}, {}
    bar = tqdm(total=len(good), desc="converting", disable=not progress, file=sys.stderr, mininterval=2)
    for split, records in splits.items():
        serialized = []
        for record in records:
            label = manifest_lib.label_id(record, label_names)
            serialized.append(_example(record, label, config).SerializeToString())
            bar.update()
        if not records:
            continue
        shards[split] = _write_shards(out_dir, split, serialized, config.num_shards)
        counts[split] = _split_counts(records, label_names)
    bar.close()
    counts["skipped"] = sorted({p.record_id for p in problems})
    metadata = DatasetMetadata(
        label_names=label_names,
        vocabulary=vocabulary,
        counts=counts,
        shards=shards,
        sample_rate=config.audio.sample_rate,
        source=source,
    )
    metadata.save(out_dir)
    (out_dir / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    return metadata
