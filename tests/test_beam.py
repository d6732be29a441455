"""The Beam converter writes the dataset the single-process converter writes."""

import csv
import json
from pathlib import Path

import pytest

from multimodal_tf import cli
from multimodal_tf.compat import tf
from multimodal_tf.config import DataConfig
from multimodal_tf.data import convert
from multimodal_tf.data.synthetic import synthesize

beam_convert = pytest.importorskip("multimodal_tf.data.beam_convert", reason="needs multimodal-tf[beam]")

# In-process FnApiRunner: no worker processes to start (each would import TF).
IN_PROCESS = ["--runner=FnApiRunner"]


@pytest.fixture(scope="module")
def planted_manifest(tmp_path_factory) -> Path:
    """40 synthetic rows plus six bad ones, one per failure kind, and no val split."""
    folder = tmp_path_factory.mktemp("planted")
    manifest = synthesize(folder, num_examples=40, seed=3)
    rows = list(csv.reader(open(manifest, encoding="utf-8")))
    good_png, good_wav = "images/synth_00000.png", "audio/synth_00001.wav"
    (folder / "corrupt.png").write_bytes((folder / good_png).read_bytes()[:30] + b"\x00garbage")
    wav = (folder / good_wav).read_bytes()
    (folder / "truncated.wav").write_bytes(wav[: len(wav) // 2])
    bad_text = b"caf\xe9".decode("utf-8", "surrogateescape")
    rows += [
        ["bad_missing", "nope.png", "a red thing", good_wav, 1, "class_1", "train"],
        ["bad_png", "corrupt.png", "a red thing", good_wav, 2, "class_2", "train"],
        ["bad_wav", good_png, "a red thing", "truncated.wav", 3, "class_3", "test"],
        ["bad_utf8", good_png, bad_text, good_wav, 4, "class_4", "train"],
        ["bad_label", good_png, "a red thing", good_wav, "cat", "cat", "train"],
        ["bad_two", "nope.png", "", "", 5, "class_5", "holdout"],
    ]
    with open(manifest, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        csv.writer(f).writerows(rows)
    return manifest


def _examples(directory: Path, names: list[str]) -> dict[str, bytes]:
    """id -> serialized example over a split's shards."""
    examples = {}
    for record in tf.data.TFRecordDataset([str(directory / name) for name in names]):
        parsed = tf.train.Example.FromString(record.numpy())
        examples[parsed.features.feature["id"].bytes_list.value[0].decode()] = record.numpy()
    return examples


def _assert_same_records(tmp_path, local_shards, beam_shards) -> dict:
    """Both converters wrote byte-identical examples per split; returns the last split's {id: bytes}."""
    expected = {}
    for split in local_shards:
        expected = _examples(tmp_path / "local", local_shards[split])
        got = _examples(tmp_path / "beam", beam_shards[split])
        assert sorted(got) == sorted(expected), split
        for record_id, serialized in expected.items():
            assert got[record_id] == serialized, (split, record_id)
    return expected


def _with_a_val_row(manifest: Path) -> Path:
    """The manifest with its first row in the val split: held-out train rows then stay in train."""
    rows = list(csv.reader(open(manifest, encoding="utf-8", errors="surrogateescape")))
    rows[1][-1] = "val"
    path = manifest.with_name("with_val.csv")
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.mark.parametrize("val_split", ["held out of train", "in the manifest"])
def test_beam_and_single_process_converters_write_the_same_dataset(planted_manifest, tmp_path, val_split):
    if val_split == "in the manifest":
        planted_manifest = _with_a_val_row(planted_manifest)
    config = DataConfig(num_shards=3, validation_fraction=0.2)
    local = convert.convert(planted_manifest, tmp_path / "local", config, on_error="skip", progress=False)
    on_beam = beam_convert.convert_with_beam(
        planted_manifest, tmp_path / "beam", config, on_error="skip", beam_options=IN_PROCESS
    )
    assert on_beam.label_names == local.label_names
    assert on_beam.vocabulary == local.vocabulary and len(local.vocabulary) > 40
    assert on_beam.counts == local.counts and on_beam.source == local.source
    assert set(on_beam.shards) == set(local.shards) == {"train", "val", "test"}
    assert (local.counts["val"]["examples"] == 1) == (val_split == "in the manifest")
    _assert_same_records(tmp_path, local.shards, on_beam.shards)
    assert (tmp_path / "beam" / "vocab.txt").read_bytes() == (tmp_path / "local" / "vocab.txt").read_bytes()
    assert not (tmp_path / "beam" / beam_convert.STAGING).exists()
    # The dead-letter output: each bad record with its row, field and reason.
    dead_letter = (tmp_path / "beam" / convert.DEAD_LETTER_FILE).read_text(encoding="utf-8")
    assert dead_letter == (tmp_path / "local" / convert.DEAD_LETTER_FILE).read_text(encoding="utf-8")
    problems = [json.loads(line) for line in dead_letter.splitlines()]
    found = {(p["record_id"], p["field"]) for p in problems}
    assert found == {
        ("bad_missing", "image"),
        ("bad_png", "image"),
        ("bad_wav", "audio"),
        ("bad_utf8", "text"),
        ("bad_label", "label"),
        ("bad_two", "image"),
        ("bad_two", "split"),
    }
    assert all(p["reason"] and p["row"] > 40 for p in problems)
    assert local.counts["skipped"] == [
        "bad_label",
        "bad_missing",
        "bad_png",
        "bad_two",
        "bad_utf8",
        "bad_wav",
    ]


def test_beam_converter_fails_listing_bad_records_and_writes_no_dataset(planted_manifest, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(
        [
            "data",
            "convert",
            str(planted_manifest),
            str(out),
            "--runner",
            "beam",
            "--beam-option=--runner=FnApiRunner",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "7 problems" in error and "id=bad_wav audio:" in error and "id=bad_two split:" in error
    assert not (out / "metadata.json").exists() and not list(out.glob("*.tfrecord"))


def test_beam_refuses_a_stratified_hold_out_by_name(planted_manifest, tmp_path):
    from multimodal_tf.data import beam_convert

    config = DataConfig(validation_split="stratified")
    with pytest.raises(convert.ConversionError, match="data.validation_split: 'stratified'"):
        beam_convert.convert_with_beam(planted_manifest, tmp_path / "out", config)


def test_beam_batch_prediction_equals_the_in_process_path(tmp_path):
    import serving_helpers as helpers

    from multimodal_tf.cli import serving as serving_cli

    helpers.make_test_savedmodel(tmp_path / "models", "m", 1)
    inputs = helpers.make_inputs(7, seed=4)
    rows = [["id", "image", "text", "audio", "label"]]
    for i in range(7):
        (tmp_path / f"{i}.png").write_bytes(inputs["image"][i])
        (tmp_path / f"{i}.wav").write_bytes(inputs["audio"][i])
        rows.append([f"r{i}", f"{i}.png", inputs["text"][i].decode(), f"{i}.wav" if i % 3 else "", "cat"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows.append(["bad", "bad.png", "", "", "dog"])
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    outputs = {}
    for runner in ("local", "beam"):
        outputs[runner] = tmp_path / f"{runner}.csv"
        argv = [
            "predict",
            "--saved-model",
            str(tmp_path / "models" / "m"),
            "--manifest",
            str(tmp_path / "m.csv"),
        ]
        argv += ["--output", str(outputs[runner]), "--batch-size", "3", "--runner", runner]
        argv += ["--beam-option=--runner=FnApiRunner"] if runner == "beam" else []
        assert cli.main(argv) == 1  # the bad row failed, the others did not
    local, on_beam = (outputs[r].read_bytes().splitlines(keepends=True) for r in ("local", "beam"))
    assert on_beam[0] == local[0] and sorted(on_beam[1:]) == sorted(local[1:])  # byte for byte
    local = list(csv.reader(open(outputs["local"], newline="")))
    errors = {row[0]: row[-1] for row in local[1:]}
    assert len(errors) == 8 and "not a PNG" in errors.pop("bad") and not any(errors.values())
    assert serving_cli.prediction_header(True, None, 3)[-1] == "error"


def test_beam_writes_the_local_converters_target_features_and_metadata(planted_manifest, tmp_path):
    """Multilabel + regression targets with missing cells: same records and metadata.targets."""
    from multimodal_tf.config import TargetConfig
    from multimodal_tf.testing import with_target_columns

    rows = list(csv.reader(open(planted_manifest, encoding="utf-8", errors="surrogateescape")))
    # with_target_columns derives tags from int labels and reads UTF-8; next to the media it names.
    without_bad_label = planted_manifest.with_name("planted_for_targets.csv")
    with open(without_bad_label, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        csv.writer(f).writerows(r for r in rows if r[0] not in ("bad_label", "bad_utf8"))
    manifest = with_target_columns(without_bad_label, tmp_path / "targets.csv")
    rows = list(csv.DictReader(open(manifest, encoding="utf-8", errors="surrogateescape")))
    assert any(not r["tags"] for r in rows) and any(not r["rating"] for r in rows)
    for row in rows:  # a label only a skipped record has is not in the vocabulary
        row["tags"] = "only_bad" if row["id"] == "bad_png" else row["tags"]
    with open(manifest, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = DataConfig(
        num_shards=2,
        validation_fraction=0.2,
        targets=(
            TargetConfig(name="category", column="label"),
            TargetConfig(name="tags", column="tags", type="multilabel"),
            TargetConfig(name="score", column="rating", type="regression"),
        ),
    )
    local = convert.convert(manifest, tmp_path / "local", config, on_error="skip", progress=False)
    on_beam = beam_convert.convert_with_beam(
        manifest, tmp_path / "beam", config, on_error="skip", beam_options=IN_PROCESS
    )
    assert on_beam.targets == local.targets
    assert local.targets["tags"]["label_names"] == ["even", "mod3_0", "mod3_1", "mod3_2"]
    assert local.targets["score"]["counts"]["train"]["missing"] > 0
    assert on_beam.counts == local.counts and on_beam.vocabulary == local.vocabulary
    expected = _assert_same_records(tmp_path, local.shards, on_beam.shards)
    parsed = tf.train.Example.FromString(next(iter(expected.values()))).features.feature
    assert "target_tags" in parsed and "target_score_present" in parsed
