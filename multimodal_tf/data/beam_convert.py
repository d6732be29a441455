"""``mmtf data convert --runner beam``: the conversion as an Apache Beam pipeline.

The pipeline (manifest rows -> validate, decode, resample -> ``tf.Example``
-> sharded ``WriteToTFRecord``) writes the dataset the single-process
converter writes (data/convert.py): the same examples, features, counts and
vocabulary; only which shard holds an example differs. Bad records go to a
dead-letter output (``dead_letter.jsonl``: id, row, field, reason).

What runs where:

- The launcher parses the manifest CSV (rows only, no media) to know the
  class names and whether a val split exists; every media read, decode,
  resample and serialization runs on the workers.
- The vocabulary is a combine: workers count the words of their train texts
  (``text.count_words``), partial counts add up, and the WordPiece learner
  runs once on the total (``text.vocabulary_from_counts``) — the learner
  needs the whole corpus's counts, which is what the accumulator holds (one
  entry per distinct word, not per text).

Runners: locally Beam's FnApiRunner, in-process or with
``--direct_running_mode=multi_processing --direct_num_workers=N``; on a
cluster any runner by its options (docs/data.md lists Dataflow, Flink and
Spark flags). The default local runner is chosen explicitly because Beam's
DirectRunner first tries the Prism runner, which downloads a binary.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from multimodal_tf.config import DataConfig
from multimodal_tf.data import convert as convert_lib
from multimodal_tf.data import manifest as manifest_lib
from multimodal_tf.data import text as text_lib
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.data.validate import Problem, check_record

SPLITS = (manifest_lib.TRAIN, manifest_lib.VAL, manifest_lib.TEST)
DEAD_LETTER = "dead_letter"
STAGING = ".beam-staging"


def local_options(num_workers: int = 0) -> list[str]:
    """Options of a local run without downloads: FnApiRunner, one process per worker."""
    workers = num_workers or os.cpu_count() or 1
    return [
        "--runner=FnApiRunner",
        "--direct_running_mode=multi_processing",
        f"--direct_num_workers={workers}",
    ]


class Encoded(NamedTuple):
    """A good record after conversion."""

    record_id: str
    split: str  # the manifest's split (data/convert.split_of may move train to val)
    label: int
    present: tuple[bool, bool, bool]  # image, text, audio
    text: str
    serialized: bytes


class EncodeRecord(beam.DoFn):
    """Record -> ``Encoded`` (main output) or its problems (``dead_letter`` output)."""

    def __init__(self, label_names: list[str], config: DataConfig):
        self.label_names, self.config = label_names, config

    def process(self, record):
        problems = check_record(record, self.label_names, self.config)
        if problems:
            # The index keeps a record's problems in the order check_record found them.
            found = [dict(vars(p), index=i) for i, p in enumerate(problems)]
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, found)
            return
        label = manifest_lib.label_id(record, self.label_names)
        example = convert_lib.make_example(record, label, self.config)
        yield Encoded(
            record_id=record.id,
            split=manifest_lib.SPLIT_ALIASES[record.split],
            label=label,
            present=(bool(record.image), bool(record.text), bool(record.audio)),
            text=record.text.decode("utf-8"),
            serialized=example.SerializeToString(),
        )


class VocabularyFn(beam.CombineFn):
    """Train texts -> WordPiece vocabulary; the accumulator is (word counts, texts not yet counted).

    Texts are counted in blocks of ``BLOCK`` (one tokenizer call each) rather
    than one at a time.
    """

    BLOCK = 1024

    def __init__(self, config: DataConfig):
        self.config = config

    def create_accumulator(self):
        return collections.Counter(), []

    def add_input(self, accumulator, text: str):
        counts, pending = accumulator
        pending.append(text)
        if len(pending) >= self.BLOCK:
            counts.update(text_lib.count_words(pending, self.config.text))
            pending.clear()
        return counts, pending

    def merge_accumulators(self, accumulators):
        total, pending = collections.Counter(), []
        for counts, texts in accumulators:
            total.update(counts)
            pending.extend(texts)
        return self.add_input((total, pending[1:]), pending[0]) if pending else (total, [])

    def extract_output(self, accumulator):
        counts, pending = accumulator
        counts = counts + text_lib.count_words(pending, self.config.text)
        return text_lib.vocabulary_from_counts(counts, self.config.text)


class SplitCountsFn(beam.CombineFn):
    """``Encoded`` -> per split: examples, per-class and per-modality counts (as data/convert.py)."""

    def __init__(self, label_names: list[str]):
        self.label_names = label_names

    def create_accumulator(self):
        return {}

    def add_input(self, accumulator, encoded: Encoded):
        info = accumulator.setdefault(
            encoded.split,
            {
                "examples": 0,
                "labels": dict.fromkeys(self.label_names, 0),
                "present": dict.fromkeys(("image", "text", "audio"), 0),
            },
        )
        info["examples"] += 1
        info["labels"][self.label_names[encoded.label]] += 1
        for modality, present in zip(("image", "text", "audio"), encoded.present, strict=False):
            info["present"][modality] += int(present)
        return accumulator

    def merge_accumulators(self, accumulators):
        total: dict = {}
        for accumulator in accumulators:
            for split, info in accumulator.items():
                if split not in total:
                    total[split] = json.loads(json.dumps(info))
                    continue
                total[split]["examples"] += info["examples"]
                for key in ("labels", "present"):
                    for name, value in info[key].items():
                        total[split][key][name] += value
        return total

    def extract_output(self, accumulator):
        return accumulator


def _write_json(pcollection, out_dir: Path, name: str, label: str):
    return (
        pcollection
        | f"{label}ToJson" >> beam.Map(lambda value: json.dumps(value, ensure_ascii=False))
        | f"Write{label}" >> beam.io.WriteToText(str(out_dir / name), shard_name_template="")
    )


def _assign_split(encoded: Encoded, has_val: bool, fraction: float) -> Encoded:
    if encoded.split != manifest_lib.TRAIN or has_val:
        return encoded
    return encoded._replace(split=convert_lib.split_of_train(encoded.record_id, has_val, fraction))


def build_pipeline(pipeline, records, label_names, config: DataConfig, staging: Path):
    """Adds the conversion's transforms to ``pipeline``; outputs land in ``staging``."""
    rows = pipeline | "Rows" >> beam.Create(records)
    encoded = rows | "Encode" >> beam.ParDo(EncodeRecord(label_names, config)).with_outputs(
        DEAD_LETTER, main="good"
    )
    problems = encoded[DEAD_LETTER] | "Problems" >> beam.FlatMap(lambda found: found)
    _write_json(problems, staging, DEAD_LETTER + ".jsonl", "DeadLetter")
    # As in the single-process path, train rows are held out as val only when
    # no good record is in a val split: a global fact, hence a side input.
    has_val = (
        encoded.good
        | "IsVal" >> beam.Map(lambda e: e.split == manifest_lib.VAL)
        | "HasVal" >> beam.CombineGlobally(any)
    )
    good = encoded.good | "AssignSplit" >> beam.Map(
        _assign_split, beam.pvalue.AsSingleton(has_val), config.validation_fraction
    )
    by_split = good | "BySplit" >> beam.Partition(lambda e, _: SPLITS.index(e.split), len(SPLITS))
    for split, part in zip(SPLITS, by_split, strict=False):
        _ = (
            part
            | f"Serialized{split}" >> beam.Map(lambda e: e.serialized)
            | f"Write{split}"
            >> beam.io.WriteToTFRecord(
                str(staging / split), file_name_suffix=".tfrecord", num_shards=config.num_shards
            )
        )
    counts = good | "Counts" >> beam.CombineGlobally(SplitCountsFn(label_names))
    _write_json(counts, staging, "counts.json", "Counts")
    vocabulary = (
        by_split[SPLITS.index(manifest_lib.TRAIN)]
        | "TrainTexts" >> beam.Map(lambda e: e.text)
        | "Vocabulary" >> beam.CombineGlobally(VocabularyFn(config))
    )
    _write_json(vocabulary, staging, "vocabulary.json", "Vocabulary")


def _read_problems(staging: Path) -> list[Problem]:
    path = staging / (DEAD_LETTER + ".jsonl")
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    found = sorted((json.loads(line) for line in lines), key=lambda p: (p["row"], p.pop("index")))
    return [Problem(**problem) for problem in found]


def convert_with_beam(
    manifest_path: str | Path,
    out_dir: str | Path,
    config: DataConfig,
    on_error: str = "fail",
    beam_options: Sequence[str] = (),
    force: bool = False,
) -> DatasetMetadata:
    """Converts a manifest on Beam; same result and arguments as ``convert.convert``.

    Args:
        beam_options: Beam pipeline options (``--runner=...`` and the runner's
            own); without ``--runner``, ``local_options()`` are added.
    """
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    source = {
        "manifest": str(manifest_path.resolve()),
        "fingerprint": convert_lib.source_fingerprint(manifest_path, config),
    }
    if not force and (existing := convert_lib.up_to_date(out_dir, source)):
        return existing
    manifest = manifest_lib.read_manifest(manifest_path, config)
    label_names = manifest_lib.label_names_of(manifest)
    options = list(beam_options)
    if not any(option.startswith("--runner") for option in options):
        options += local_options()
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
        build_pipeline(pipeline, manifest.records, label_names, config, staging)
    problems = _read_problems(staging)
    if problems and on_error == "fail":
        shutil.rmtree(staging)
        raise convert_lib.ConversionError(convert_lib.failure_message(manifest_path, problems))
    return _publish(staging, out_dir, label_names, problems, config, source)


def _publish(staging, out_dir, label_names, problems, config, source) -> DatasetMetadata:
    """Moves the shards out of ``staging`` and writes the metadata last."""
    (out_dir / "metadata.json").unlink(missing_ok=True)  # stale until rewritten
    counts = json.loads((staging / "counts.json").read_text() or "{}")
    vocabulary = json.loads((staging / "vocabulary.json").read_text())
    shards = {}
    for split in SPLITS:
        # Beam writes num_shards files even for fewer examples; an empty shard
        # could leave a multi-worker input pipeline without data (pipeline.shard_files).
        names = sorted(p.name for p in staging.glob(f"{split}-*.tfrecord") if p.stat().st_size)
        if split not in counts:  # no example: the single-process path writes no shard either
            continue
        for name in names:
            os.replace(staging / name, out_dir / name)
        shards[split] = names
    counts = {split: counts[split] for split in SPLITS if split in counts}
    counts["skipped"] = sorted({p.record_id for p in problems})
    convert_lib.write_dead_letter(out_dir, problems)
    shutil.rmtree(staging)
    return convert_lib.finish(out_dir, label_names, vocabulary, counts, shards, config, source)
