"""Manifest validation, conversion to TFRecords and the tf.data pipeline."""

import csv
import dataclasses
import os
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimodal_tf import cli
from multimodal_tf.compat import tf
from multimodal_tf.config import DataConfig, ExperimentConfig
from multimodal_tf.data import cache, convert, pipeline, validate
from multimodal_tf.data.audio_io import encode_wav16, parse_wav
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.data.synthetic import synthesize
from tests.conftest import one_val_example_manifest, shared_manifest

HEADER = ["id", "image", "text", "audio", "label", "split"]


def _png(path: Path, value=128):
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


def _wav(path: Path, seconds=0.3, rate=16000):
    t = np.arange(int(rate * seconds)) / rate
    path.write_bytes(encode_wav16(0.3 * np.sin(2 * np.pi * 440 * t), rate))


def _write_manifest(folder: Path, rows) -> Path:
    path = folder / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


@pytest.fixture
def seeded_manifest(tmp_path) -> Path:
    """Good records plus exactly five bad ones, one per failure kind."""
    for i in range(4):
        _png(tmp_path / f"ok{i}.png", 50 * i)
        _wav(tmp_path / f"ok{i}.wav")
    full = (tmp_path / "ok0.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(full[: len(full) // 2])
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "ok0.png").read_bytes()[:30] + b"\x00garbage")
    rows = [[f"good{i}", f"ok{i}.png", "a red thing", f"ok{i}.wav", i % 2, "train"] for i in range(4)]
    rows += [
        ["good_test", "ok1.png", "", "ok1.wav", 1, "test"],  # missing text: fine
        ["bad_missing", "nope.png", "text", "ok0.wav", 0, "train"],
        ["bad_wav", "ok0.png", "text", "truncated.wav", 0, "train"],
        ["bad_png", "corrupt.png", "text", "ok0.wav", 1, "train"],
        ["bad_utf8", "ok0.png", b"caf\xe9".decode("utf-8", "surrogateescape"), "ok0.wav", 1, "test"],
        ["bad_label", "ok0.png", "text", "ok0.wav", 7, "test"],
    ]
    return _write_manifest(tmp_path, rows)


def test_validation_reports_exactly_the_seeded_bad_records(seeded_manifest):
    report = validate.validate(seeded_manifest, DataConfig())
    by_id = {p.record_id: p for p in report.problems}
    assert set(by_id) == {"bad_missing", "bad_wav", "bad_png", "bad_utf8", "bad_label"}
    assert len(report.problems) == 5
    assert (by_id["bad_missing"].field, "file not found") == ("image", by_id["bad_missing"].reason[:14])
    assert by_id["bad_wav"].field == "audio" and "truncated" in by_id["bad_wav"].reason
    assert by_id["bad_png"].field == "image" and "cannot decode" in by_id["bad_png"].reason
    assert by_id["bad_utf8"].field == "text" and "UTF-8" in by_id["bad_utf8"].reason
    assert by_id["bad_label"].field == "label" and "'7'" in by_id["bad_label"].reason
    text = report.to_text()
    assert "bad records: 5" in text and "missing: image 0, text 1, audio 0" in text


def test_validate_cli_fails_or_skips(seeded_manifest, capsys):
    assert cli.main(["data", "validate", str(seeded_manifest)]) == 1
    out = capsys.readouterr()
    assert "bad_png" in out.out and "FAILED: 5 bad records" in out.err
    assert cli.main(["data", "validate", str(seeded_manifest), "--on-error", "skip"]) == 0


def test_convert_fails_listing_records_or_skips_them(seeded_manifest, tmp_path, capsys):
    assert cli.main(["data", "convert", str(seeded_manifest), str(tmp_path / "out")]) == 2
    assert "bad_wav" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metadata.json").exists()
    assert (
        cli.main(["data", "convert", str(seeded_manifest), str(tmp_path / "out2"), "--on-error", "skip"]) == 0
    )
    metadata = DatasetMetadata.load(tmp_path / "out2")
    assert len(metadata.counts["skipped"]) == 5
    total = sum(metadata.counts[s]["examples"] for s in metadata.shards)
    assert total == 5


def test_audio_of_any_pcm_width_rate_and_channels_is_stored_as_16_bit_at_the_configured_rate(tmp_path):
    rate = 8000
    t = np.arange(rate // 2) / rate
    tone = (0.4 * np.sin(2 * np.pi * 300 * t) * (1 << 23)).astype(np.int32)
    raw = np.stack([tone, tone], -1).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    with wave.open(str(tmp_path / "a24.wav"), "wb") as w:
        w.setnchannels(2), w.setsampwidth(3), w.setframerate(rate), w.writeframes(raw)
    _png(tmp_path / "i.png")
    manifest = _write_manifest(tmp_path, [["x", "i.png", "", "a24.wav", 0, "train"]])
    config = DataConfig(validation_fraction=0.0)
    convert.convert(manifest, tmp_path / "out", config, progress=False)
    record = next(iter(tf.data.TFRecordDataset(str(next((tmp_path / "out").glob("train-*"))))))
    example = tf.train.Example.FromString(record.numpy())
    stored = example.features.feature["audio"].bytes_list.value[0]
    values, stored_rate = parse_wav(stored)
    assert stored_rate == 16000 and values.shape == (8000, 2)
    assert stored[34] == 16  # bits per sample
    assert abs(np.abs(values[:, 0]).max() - 0.4) < 0.05
    assert example.features.feature["text_present"].int64_list.value[0] == 0


def test_conversion_is_idempotent_and_atomic(synth_manifest, tmp_path):
    out = tmp_path / "tfr"
    first = convert.convert(synth_manifest, out, DataConfig(), progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = convert.convert(synth_manifest, out, DataConfig(), progress=False)
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # An interrupted run: a leftover temp shard and no metadata -> redone, temp ignored.
    (out / "metadata.json").unlink()
    (out / ".train-00000-of-00004.tfrecord.tmp123").write_bytes(b"partial")
    third = convert.convert(synth_manifest, out, DataConfig(), progress=False)
    assert third.shards == first.shards
    assert all(not name.startswith(".") for names in third.shards.values() for name in names)


def test_pipeline_yields_every_example_once_with_its_label(synth_manifest, tmp_path):
    config = ExperimentConfig(
        data=DataConfig(manifest=str(synth_manifest), tfrecord_dir=str(tmp_path / "t"), batch_size=16)
    )
    metadata = convert.convert(synth_manifest, tmp_path / "t", config.data, progress=False)
    rows = {r["id"]: int(r["label"]) for r in csv.DictReader(open(synth_manifest))}
    seen = {}
    for split in ("train", "val", "test"):
        for _, labels, ids in pipeline.make_dataset(config, split, training=False, with_ids=True):
            for label, example_id in zip(labels.numpy(), ids.numpy(), strict=False):
                seen[example_id.decode()] = int(label)
    assert seen == rows
    assert sum(metadata.counts[s]["examples"] for s in ("train", "val", "test")) == len(rows)


@pytest.mark.parametrize("num_files,workers,data_sharded", [(4, 2, False), (1, 2, True), (3, 2, False)])
def test_multi_worker_sharding_covers_all_files_without_empty_workers(num_files, workers, data_sharded):
    files = [f"f{i}" for i in range(num_files)]
    parts = [pipeline.shard_files(files, tf.distribute.InputContext(workers, i, 1)) for i in range(workers)]
    assert all(flag == data_sharded for _, flag in parts)
    assert all(part for part, _ in parts)  # no worker without input
    if not data_sharded:
        assert sorted(f for part, _ in parts for f in part) == files


def test_a_split_smaller_than_the_worker_count_feeds_every_worker(synth_manifest, tmp_path):
    """One val example, three input pipelines: no worker may be left without data."""
    manifest, val_id = one_val_example_manifest(synth_manifest, synth_manifest.parent / "one_val.csv")
    config = ExperimentConfig(
        data=DataConfig(manifest=str(manifest), tfrecord_dir=str(tmp_path / "t"), batch_size=6)
    )
    metadata = convert.convert(manifest, tmp_path / "t", config.data, progress=False)
    assert metadata.counts["val"]["examples"] == 1
    for index in range(3):
        context = tf.distribute.InputContext(3, index, 1)
        ids = [
            i.decode()
            for _, _, batch in pipeline.make_dataset(config, "val", context, training=False, with_ids=True)
            for i in batch.numpy()
        ]
        assert ids == [val_id], index
        # The train split (enough examples) is still sharded: disjoint parts.
    parts = [
        {
            i.decode()
            for _, _, batch in pipeline.make_dataset(
                config, "train", tf.distribute.InputContext(3, index, 1), training=False, with_ids=True
            )
            for i in batch.numpy()
        }
        for index in range(3)
    ]
    assert all(parts) and not (parts[0] & parts[1]) and not (parts[1] & parts[2])
    assert sum(map(len, parts)) == metadata.counts["train"]["examples"]


def _manifest_counts(manifest: Path):
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    return rows, {s: sum(r["split"] == s for r in rows) for s in ("train", "test")}


@pytest.mark.parametrize("name", ["avmnist", "emoji3"])
def test_real_dataset_round_trip(name, tmp_path):
    manifest = shared_manifest(name)
    rows, split_counts = _manifest_counts(manifest)
    config = ExperimentConfig(
        data=DataConfig(manifest=str(manifest), tfrecord_dir=str(tmp_path / name), batch_size=256)
    )
    metadata = convert.convert(manifest, tmp_path / name, config.data, progress=False)
    assert metadata.counts["skipped"] == []
    assert metadata.counts["train"]["examples"] + metadata.counts["val"]["examples"] == split_counts["train"]
    assert metadata.counts["test"]["examples"] == split_counts["test"]
    names = {int(r["label"]): r["label_name"] for r in rows}
    assert metadata.label_names == [names[i] for i in range(len(names))]
    expected = {r["id"]: int(r["label"]) for r in rows if r["split"] == "test"}
    got = {}
    for x, labels, ids in pipeline.make_dataset(
        config, "test", training=False, metadata=metadata, with_ids=True
    ):
        got.update({i.decode(): int(y) for i, y in zip(ids.numpy(), labels.numpy(), strict=False)})
        if name == "avmnist":  # no text in avmnist: flagged absent, not an error
            assert not x["text_present"].numpy().any() and x["audio_present"].numpy().all()
    assert got == expected
    if name == "avmnist":
        assert metadata.counts["test"]["present"]["text"] == 0


def test_a_replaced_media_file_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    manifest = synthesize(tmp_path / "data", num_examples=8, seed=0)
    config = DataConfig(manifest=str(manifest), num_shards=1, validation_fraction=0.0)
    image = tmp_path / "data" / "images" / "synth_00002.png"
    first = cache.prepare_data(config, progress=False)
    first_dir = cache.default_tfrecord_dir(config)
    replacement = synthesize(tmp_path / "other", num_examples=8, seed=5).parent / "images" / "synth_00002.png"
    image.write_bytes(replacement.read_bytes())  # same path, new size and mtime
    second = cache.prepare_data(config, progress=False)
    second_dir = cache.default_tfrecord_dir(config)
    assert second_dir != first_dir and second.source["fingerprint"] != first.source["fingerprint"]
    stored = {}
    for record in tf.data.TFRecordDataset([str(second_dir / n) for n in second.shards["train"]]):
        example = tf.train.Example.FromString(record.numpy()).features.feature
        stored[example["id"].bytes_list.value[0]] = example["image"].bytes_list.value[0]
    assert stored[b"synth_00002"] == replacement.read_bytes()
    # Same size and mtime, other bytes: size + mtime cannot tell, the content hash can.
    hashed = dataclasses.replace(config, hash_media=True)
    before = convert.source_fingerprint(manifest, hashed)
    stat = image.stat()
    image.write_bytes(bytes(reversed(image.read_bytes())))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.default_tfrecord_dir(config) == second_dir
    assert convert.source_fingerprint(manifest, hashed) != before


def test_shards_are_written_round_robin_from_a_stream(tmp_path):
    def stream():  # a generator: the writer never sees the whole split
        for index in range(7):
            yield f"example {index}".encode()

    names = convert._write_shards(tmp_path, "train", stream(), 3)
    assert names == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    contents = [[r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / n))] for n in names]
    assert contents[0] == [b"example 0", b"example 3", b"example 6"] and contents[2] == [
        b"example 2",
        b"example 5",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary file left


def test_features_over_the_memory_budget_are_cached_on_disk(synth_manifest, tmp_path, monkeypatch):
    monkeypatch.setenv(pipeline.FEATURE_CACHE_ENV, str(tmp_path / "features"))
    (tmp_path / "features").mkdir()
    data = DataConfig(manifest=str(synth_manifest), tfrecord_dir=str(tmp_path / "t"), batch_size=64)
    convert.convert(synth_manifest, tmp_path / "t", data, progress=False)
    epochs = {}
    for budget in (2048, 0):
        config = ExperimentConfig(data=dataclasses.replace(data, cache_memory_mb=budget))
        dataset = pipeline.make_dataset(config, "train", training=False, with_ids=True)
        epochs[budget] = [[ids.numpy().tolist() for _, _, ids in dataset] for _ in range(2)]
        files = list((tmp_path / "features").rglob("features*"))
        assert bool(files) == (budget == 0)  # over budget: a cache file, else none
    assert epochs[0][0] == epochs[0][1] == epochs[2048][0]


def test_a_runs_metadata_finds_its_records_from_another_cache_or_says_why(tmp_path, monkeypatch):
    # A run evaluated from another working directory (the cache is relative) or
    # after the cache was cleared: converted again, not a NotFoundError mid-iteration.
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache_a"))
    manifest = synthesize(tmp_path / "data", num_examples=8, seed=0)
    config = ExperimentConfig(data=DataConfig(manifest=str(manifest), num_shards=1, validation_fraction=0.0))
    metadata = cache.prepare_data(config.data, progress=False)
    before = [
        ids.numpy().tolist()
        for _, _, ids in pipeline.make_dataset(config, "train", training=False, with_ids=True)
    ]
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache_b"))  # empty: nothing converted there
    after = [
        ids.numpy().tolist()
        for _, _, ids in pipeline.make_dataset(
            config, "train", training=False, metadata=metadata, with_ids=True
        )
    ]
    assert after == before and (tmp_path / "cache_b" / "tfrecords").is_dir()
    # Without a manifest there is nothing to convert from: the error names the folder.
    lost = ExperimentConfig(data=DataConfig(tfrecord_dir=str(tmp_path / "gone"), num_shards=1))
    with pytest.raises(FileNotFoundError, match=r"missing from .*gone.*data.manifest is empty"):
        pipeline.make_dataset(lost, "train", training=False, metadata=metadata)
