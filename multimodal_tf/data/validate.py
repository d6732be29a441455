"""``mmtf data validate``: check every manifest record and report."""

from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path

import tensorflow as tf

from multimodal_tf import targets as targets_lib
from multimodal_tf.config import DataConfig
from multimodal_tf.data import audio_io
from multimodal_tf.data import manifest as manifest_lib
from multimodal_tf.data.image import decode_image


@dataclasses.dataclass
class Problem:
    record_id: str
    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} id={self.record_id} {self.field}: {self.reason}"


@dataclasses.dataclass
class Report:
    """Validation result: counts and every problem found."""

    manifest: str
    label_names: list[str]
    counts: dict
    problems: list[Problem]

    @property
    def bad_ids(self) -> list[str]:
        return sorted({p.record_id for p in self.problems})

    def to_text(self) -> str:
        lines = [f"manifest: {self.manifest}", f"records: {self.counts['records']}"]
        lines.append(f"classes ({len(self.label_names)}): {', '.join(self.label_names)}")
        for split, info in sorted(self.counts["splits"].items()):
            lines.append(f"split {split}: {info['examples']} examples")
            present = ", ".join(f"{m} {n}" for m, n in info["present"].items())
            missing = ", ".join(f"{m} {n}" for m, n in info["missing"].items())
            lines.append(f"  present: {present}")
            lines.append(f"  missing: {missing}")
            per_label = ", ".join(f"{k}: {v}" for k, v in sorted(info["labels"].items()))
            lines.append(f"  labels: {per_label}")
        if self.problems:
            lines.append(f"bad records: {len(self.bad_ids)} ({len(self.problems)} problems)")
            lines.extend(f"  {p}" for p in self.problems)
        else:
            lines.append("bad records: 0")
        return "\n".join(lines)


_DECODERS: dict = {}


def _image_decoder(config: DataConfig):
    """The training/serving decode, traced once per image config."""
    if config.image not in _DECODERS:
        _DECODERS[config.image] = tf.function(
            lambda data: decode_image(data, config.image),
            input_signature=[tf.TensorSpec([], tf.string)],
        )
    return _DECODERS[config.image]


def _op_message(error: tf.errors.OpError) -> str:
    """The first line of a TF error without its ``{{function_node ...}}`` and Assert wrapping."""
    line = re.sub(r"\{\{[^}]*\}\}\s*", "", error.message.splitlines()[0]).strip()
    match = re.fullmatch(r"assertion failed: \[(.*)\]", line)
    return match.group(1) if match else line


def _check_image(path: str, config: DataConfig) -> str | None:
    if not Path(path).is_file():
        return f"file not found: {path}"
    try:
        # The same decode the training and serving graphs run.
        _image_decoder(config)(tf.constant(Path(path).read_bytes()))
    except tf.errors.OpError as e:
        return f"cannot decode image: {_op_message(e)}"
    return None


def _check_audio(path: str, config: DataConfig) -> str | None:
    try:
        values, rate = audio_io.read_audio(path, config.audio.reader)
    except audio_io.AudioError as e:
        return str(e)
    if values.shape[0] == 0:
        return "audio holds no samples"
    if rate <= 0:
        return f"sample rate {rate} is not readable"
    return None


def check_record(record, label_names, config: DataConfig) -> list[Problem]:
    """All problems of one record (empty list = good)."""
    found: list[tuple[str, str]] = []
    if record.image and (reason := _check_image(record.image, config)):
        found.append(("image", reason))
    if record.text_path and not Path(record.text_path).is_file():
        found.append(("text", f"file not found: {record.text_path}"))
    if record.text:
        try:
            record.text.decode("utf-8")
        except UnicodeDecodeError as e:
            found.append(("text", f"not valid UTF-8 (byte {e.start})"))
    if record.audio and (reason := _check_audio(record.audio, config)):
        found.append(("audio", reason))
    if not (record.image or record.text or record.audio or record.text_path):
        found.append(("media", "no modality present"))
    if manifest_lib.label_id(record, label_names) is None:
        found.append(("label", f"unknown label {record.label!r}; known: {', '.join(label_names)}"))
    found.extend(targets_lib.cell_problems(record, config))
    if record.split not in manifest_lib.SPLIT_ALIASES:
        found.append(("split", f"unknown split {record.split!r}; use train, val or test"))
    return [Problem(record.id, record.row, field, reason) for field, reason in found]


def validate(manifest_path: str | Path, config: DataConfig) -> Report:
    """Checks every record of a manifest; never raises for a bad record."""
    manifest = manifest_lib.read_manifest(manifest_path, config)
    label_names = manifest_lib.label_names_of(manifest)
    problems: list[Problem] = []
    splits: dict = collections.defaultdict(
        lambda: {
            "examples": 0,
            "labels": collections.Counter(),
            "present": collections.Counter(),
            "missing": collections.Counter(),
        }
    )
    seen_ids = set()
    for record in manifest.records:
        record_problems = check_record(record, label_names, config)
        if record.id in seen_ids:
            record_problems.append(Problem(record.id, record.row, "id", "duplicate id"))
        seen_ids.add(record.id)
        problems.extend(record_problems)
        info = splits[manifest_lib.SPLIT_ALIASES.get(record.split, record.split or "?")]
        info["examples"] += 1
        info["labels"][record.label_name or record.label] += 1
        for modality, value in (("image", record.image), ("text", record.text), ("audio", record.audio)):
            info["present" if value else "missing"][modality] += 1
    counts = {
        "records": len(manifest.records),
        "splits": {
            k: {kk: dict(vv) if isinstance(vv, collections.Counter) else vv for kk, vv in v.items()}
            for k, v in splits.items()
        },
    }
    for info in counts["splits"].values():
        for key in ("present", "missing"):
            info[key] = {m: info[key].get(m, 0) for m in ("image", "text", "audio")}
    return Report(str(manifest_path), label_names, counts, problems)
