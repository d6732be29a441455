"""``data.targets`` on the Beam converter: target features and their metadata as data/convert.py writes them.

A multilabel target's multi-hot row needs its label vocabulary, which is
learnt from the *good* train records (data/convert.py), and which records
are good is known only once the workers have validated their media. So,
with targets only, the pipeline gains one global step: the good records'
target cells (an id and a few short strings each, like the manifest rows
the launcher already holds) are collected, the vocabularies are computed
from them once, and each example is serialized with that result as a side
input. The launcher reads the same cells back to write ``metadata.targets``
with the single-process converter's own function, on the same records in
the same order, so the two converters write identical records and metadata
(tests/test_beam.py).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import apache_beam as beam

from multimodal_tf import targets as targets_lib
from multimodal_tf.config import DataConfig
from multimodal_tf.data import convert as convert_lib
from multimodal_tf.data import manifest as manifest_lib

CELLS_FILE = "target_cells.json"  # in the staging folder: [[group, id, {column: cell}], ...]


def splits_of(cells, held_out: str) -> dict[str, list]:
    """[(group, id, cells)] -> split -> record-like objects (``id``, ``targets``) in the converter's order.

    ``held_out``: the name of the held-out group; its records join val when
    no good record is in the val split, else train (as data/convert.py).
    """
    groups = {group for group, _, _ in cells}
    held_out_to = manifest_lib.TRAIN if manifest_lib.VAL in groups else manifest_lib.VAL
    splits: dict[str, list] = {manifest_lib.TRAIN: [], manifest_lib.VAL: [], manifest_lib.TEST: []}
    for group, record_id, targets in cells:
        split = held_out_to if group == held_out else group
        splits[split].append(types.SimpleNamespace(id=record_id, targets=dict(targets)))
    return {split: convert_lib.stable_order(records) for split, records in splits.items()}


def _vocabularies(cells, config: DataConfig, held_out: str) -> dict[str, list[str]]:
    return targets_lib.label_vocabularies(splits_of(cells, held_out)[manifest_lib.TRAIN], config)


def _serialize(encoded, config: DataConfig, vocabularies):
    example = convert_lib.make_example(encoded.record, encoded.label, config, vocabularies)
    return encoded._replace(serialized=example.SerializeToString(), record=None)


def with_target_features(good, config: DataConfig, staging: Path, held_out: str):
    """``Encoded`` records (``record`` set, not yet serialized) -> serialized with their target features.

    Also writes the good records' target cells to ``staging`` for
    :func:`metadata_entry`.
    """
    cells = (
        good
        | "TargetCells" >> beam.Map(lambda e: (e.group, e.record.id, dict(e.record.targets)))
        | "CollectTargetCells" >> beam.CombineGlobally(beam.combiners.ToListCombineFn())
    )
    _ = (
        cells
        | "TargetCellsToJson" >> beam.Map(lambda value: json.dumps(value, ensure_ascii=False))
        | "WriteTargetCells" >> beam.io.WriteToText(str(staging / CELLS_FILE), shard_name_template="")
    )
    vocabularies = cells | "TargetVocabularies" >> beam.Map(_vocabularies, config, held_out)
    return good | "SerializeWithTargets" >> beam.Map(
        _serialize, config, beam.pvalue.AsSingleton(vocabularies)
    )


def metadata_entry(staging: Path, config: DataConfig, held_out: str) -> dict:
    """``metadata.targets`` from the cells :func:`with_target_features` wrote (data/convert.py's entry)."""
    cells = json.loads((staging / CELLS_FILE).read_text(encoding="utf-8") or "[]")
    splits = splits_of(cells, held_out)
    vocabularies = targets_lib.label_vocabularies(splits[manifest_lib.TRAIN], config)
    return targets_lib.metadata_entry(config, vocabularies, splits)
