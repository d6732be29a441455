"""``mmtf data convert --runner beam``: the conversion as an Apache Beam pipeline.

The pipeline (manifest rows -> validate, decode, resample -> ``tf.Example``
-> sharded ``WriteToTFRecord``) writes the dataset the single-process
converter writes (data/convert.py): the same examples, features, counts and
vocabulary; only the shards differ (the runner picks how many). Bad records
go to a dead-letter output (``dead_letter.jsonl``: id, row, field, reason).

What runs where:

- The launcher parses the manifest CSV (rows only, no media) to know the
  class names; every media read, decode, resample and serialization runs on
  the workers. Whether a good val record exists (which decides where
  held-out train rows go) is known only at the end: see ``HELD_OUT``.
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
import copy
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from multimodal_tf.config import DataConfig
from multimodal_tf.data import beam_targets
from multimodal_tf.data import convert as convert_lib
from multimodal_tf.data import manifest as manifest_lib
from multimodal_tf.data import text as text_lib
from multimodal_tf.data.metadata import METADATA_FILE, DatasetMetadata
from multimodal_tf.data.validate import Problem, check_record

SPLITS = (manifest_lib.TRAIN, manifest_lib.VAL, manifest_lib.TEST)
# Train records whose id hash puts them in the held-out share: val when no
# good record has a val split, else train. Whether one has is known only at
# the end, so they are written and counted apart and the launcher names them.
HELD_OUT = "held_out"
GROUPS = (manifest_lib.TRAIN, HELD_OUT, manifest_lib.VAL, manifest_lib.TEST)
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

    group: str  # one of GROUPS
    label: int
    present: tuple[bool, bool, bool]  # image, text, audio
    text: str
    serialized: bytes  # b"" until beam_targets serializes it, with data.targets
    record: object = None  # the manifest record, kept until then (data.targets only)


class EncodeRecord(beam.DoFn):
    """Record -> ``Encoded`` (main output) or its problems (``dead_letter`` output)."""

    def __init__(self, label_names: list[str], config: DataConfig):
        self.label_names, self.config = label_names, config

    def _group(self, record) -> str:
        split = manifest_lib.SPLIT_ALIASES[record.split]
        held_out = split == manifest_lib.TRAIN and convert_lib.split_of_train(
            record.id, False, self.config.validation_fraction
        )
        return HELD_OUT if held_out == manifest_lib.VAL else split

    def process(self, record):
        problems = check_record(record, self.label_names, self.config)
        if problems:
            # The index keeps a record's problems in the order check_record found them.
            found = [dict(vars(p), index=i) for i, p in enumerate(problems)]
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, found)
            return
        label = manifest_lib.label_id(record, self.label_names)
        if self.config.targets:  # the example waits for the multilabel vocabularies (beam_targets)
            serialized = b""
        else:
            serialized = convert_lib.make_example(record, label, self.config).SerializeToString()
        yield Encoded(
            group=self._group(record),
            label=label,
            present=(bool(record.image), bool(record.text), bool(record.audio)),
            text=record.text.decode("utf-8"),
            serialized=serialized,
            record=record if self.config.targets else None,
        )


class WordCounts:
    """``VocabularyFn``'s accumulator: word counts and texts not yet counted, per group."""

    def __init__(self):
        self.counts = {manifest_lib.TRAIN: collections.Counter(), HELD_OUT: collections.Counter()}
        self.pending: dict[str, list[str]] = {manifest_lib.TRAIN: [], HELD_OUT: []}
        self.has_val = False


class VocabularyFn(beam.CombineFn):
    """(group, text) of every good record -> the WordPiece vocabulary of the train split.

    The learner needs the whole train split's word counts, so that is what
    accumulates: counts of the train and held-out groups apart, and whether
    a val record exists, which decides whether the held-out group is train.
    Texts are counted in blocks of ``BLOCK`` (one tokenizer call each).
    """

    BLOCK = 1024

    def __init__(self, config: DataConfig):
        self.config = config

    def create_accumulator(self) -> WordCounts:
        return WordCounts()

    def _count(self, accumulator: WordCounts, group: str, at_least: int = 1) -> None:
        if len(accumulator.pending[group]) >= at_least:
            counted = text_lib.count_words(accumulator.pending[group], self.config.text)
            accumulator.counts[group].update(counted)
            accumulator.pending[group] = []

    def add_input(self, accumulator: WordCounts, element) -> WordCounts:
        group, text = element
        accumulator.has_val |= group == manifest_lib.VAL
        if group in accumulator.pending:
            accumulator.pending[group].append(text)
            self._count(accumulator, group, self.BLOCK)
        return accumulator

    def merge_accumulators(self, accumulators) -> WordCounts:
        total = WordCounts()
        for accumulator in accumulators:
            total.has_val |= accumulator.has_val
            for group in total.counts:
                total.counts[group].update(accumulator.counts[group])
                total.pending[group].extend(accumulator.pending[group])
                self._count(total, group, self.BLOCK)
        return total

    def extract_output(self, accumulator: WordCounts) -> list[str]:
        for group in accumulator.counts:
            self._count(accumulator, group)
        total = accumulator.counts[manifest_lib.TRAIN]
        if accumulator.has_val:  # the held-out group stays in train
            total = total + accumulator.counts[HELD_OUT]
        return text_lib.vocabulary_from_counts(total, self.config.text)


class SplitCountsFn(beam.CombineFn):
    """``Encoded`` -> per split: examples, per-class and per-modality counts (as data/convert.py)."""

    def __init__(self, label_names: list[str]):
        self.label_names = label_names

    def create_accumulator(self):
        return {}

    def add_input(self, accumulator, encoded: Encoded):
        info = accumulator.setdefault(
            encoded.group,
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
                    total[split] = copy.deepcopy(info)
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


def build_pipeline(pipeline, records, label_names, config: DataConfig, staging: Path):
    """Adds the conversion's transforms to ``pipeline``; outputs land in ``staging``.

    No step waits for a global result before writing (no side input, and
    runner-chosen shards: a fixed shard count would group every example by
    shard first), so a local run streams rather than holding the dataset.
    The exception is ``data.targets``: examples wait for the multilabel
    vocabularies of the good train records (beam_targets.py).
    """
    rows = pipeline | "Rows" >> beam.Create(records)
    encoded = rows | "Encode" >> beam.ParDo(EncodeRecord(label_names, config)).with_outputs(
        DEAD_LETTER, main="good"
    )
    problems = encoded[DEAD_LETTER] | "Problems" >> beam.FlatMap(lambda found: found)
    _write_json(problems, staging, DEAD_LETTER + ".jsonl", "DeadLetter")
    good = encoded.good
    if config.targets:
        good = beam_targets.with_target_features(good, config, staging, HELD_OUT)
    by_group = good | "ByGroup" >> beam.Partition(lambda e, _: GROUPS.index(e.group), len(GROUPS))
    for group, part in zip(GROUPS, by_group, strict=True):
        _ = (
            part
            | f"Serialized_{group}" >> beam.Map(lambda e: e.serialized)
            | f"Write_{group}" >> beam.io.WriteToTFRecord(str(staging / group), file_name_suffix=".tfrecord")
        )
    counts = good | "Counts" >> beam.CombineGlobally(SplitCountsFn(label_names))
    _write_json(counts, staging, "counts.json", "Counts")
    vocabulary = (
        good
        | "GroupTexts" >> beam.Map(lambda e: (e.group, e.text))
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
    if config.validation_split != "hash":
        # A stratified hold-out depends on which train records are good,
        # which each worker learns only for its own records; the per-record
        # id hash gives every worker the same answer without a second pass.
        raise convert_lib.ConversionError(
            f"data.validation_split: {config.validation_split!r} is not available with --runner beam;"
            " use 'hash', or give the manifest a val split"
        )
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
    """Names the held-out group, moves the shards out of ``staging``, writes the metadata last."""
    (out_dir / METADATA_FILE).unlink(missing_ok=True)  # stale until rewritten
    by_group = json.loads((staging / "counts.json").read_text() or "{}")
    vocabulary = json.loads((staging / "vocabulary.json").read_text())
    held_out_to = manifest_lib.TRAIN if manifest_lib.VAL in by_group else manifest_lib.VAL
    merge = SplitCountsFn(label_names).merge_accumulators
    counts, shards = {}, {}
    for split in SPLITS:
        groups = [split] + ([HELD_OUT] if split == held_out_to else [])
        present = [g for g in groups if g in by_group]
        if not present:  # no example: the single-process path writes no shard either
            continue
        counts[split] = merge([{split: by_group[g]} for g in present])[split]
        # Beam may write an empty shard; one could leave a multi-worker input
        # pipeline without data (pipeline.shard_files).
        files = [p for g in groups for p in sorted(staging.glob(f"{g}-*.tfrecord")) if p.stat().st_size]
        shards[split] = [f"{split}-{i:05d}-of-{len(files):05d}.tfrecord" for i in range(len(files))]
        for path, name in zip(files, shards[split], strict=True):
            os.replace(path, out_dir / name)
    counts["skipped"] = sorted({p.record_id for p in problems})
    convert_lib.write_dead_letter(out_dir, problems)
    targets = beam_targets.metadata_entry(staging, config, HELD_OUT) if config.targets else None
    shutil.rmtree(staging)
    return convert_lib.finish(out_dir, label_names, vocabulary, counts, shards, config, source, targets)
