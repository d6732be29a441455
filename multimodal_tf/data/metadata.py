"""The metadata file written next to converted TFRecords."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

METADATA_FILE = "metadata.json"


@dataclasses.dataclass
class DatasetMetadata:
    """What a converted dataset holds.

    Attributes:
        label_names: class names, index = label id.
        vocabulary: WordPiece vocabulary learned from the train split's texts.
        counts: per split: examples, per-label counts, per-modality presence.
        shards: per split: TFRecord file names (relative to the folder).
        sample_rate: sample rate of the stored WAV audio.
        source: manifest path and fingerprint of the conversion settings.
        targets: per extra target of ``data.targets`` (multimodal_tf/targets.py):
            type, column, label names (multilabel) and per-split counts.
    """

    label_names: list[str]
    vocabulary: list[str]
    counts: dict
    shards: dict
    sample_rate: int
    source: dict
    targets: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / METADATA_FILE
        tmp = path.with_suffix(".tmp")
        fields = dataclasses.asdict(self)
        if not fields["targets"]:  # a single-target dataset's file stays as it was before targets
            del fields["targets"]
        tmp.write_text(json.dumps(fields, indent=1, ensure_ascii=False))
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | Path) -> DatasetMetadata:
        path = Path(directory) / METADATA_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: convert the manifest first (mmtf data convert)")
        return cls(**json.loads(path.read_text()))
