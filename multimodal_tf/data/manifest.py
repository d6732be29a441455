"""Reading a CSV manifest into records with resolved paths, texts and labels."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from multimodal_tf.config import DataConfig

TRAIN, VAL, TEST = "train", "val", "test"
SPLIT_ALIASES = {"train": TRAIN, "val": VAL, "valid": VAL, "validation": VAL, "dev": VAL, "test": TEST}


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (missing file or columns)."""


@dataclasses.dataclass
class Record:
    """One manifest row. Paths are absolute; empty string = modality absent."""

    row: int  # 1-based data row number in the CSV, for messages
    id: str
    image: str
    text: bytes  # raw UTF-8 bytes (may be invalid: validation reports it)
    text_path: str  # the text file, when the text came from one
    audio: str
    label: str
    label_name: str
    split: str  # raw split cell
    # Raw cells of the extra target columns (data.targets), column -> cell.
    targets: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Manifest:
    path: Path
    records: list[Record]


def _resolve(base: Path, cell: str) -> str:
    cell = cell.strip()
    if not cell:
        return ""
    path = Path(cell)
    return str(path if path.is_absolute() else base / path)


def _text_of(base: Path, cell: str, source: str) -> tuple[bytes, str]:
    raw = cell.encode("utf-8", "surrogateescape")
    if not cell.strip():
        return b"", ""
    candidate = Path(_resolve(base, cell))
    is_path = source == "path" or (source == "auto" and cell.strip().endswith(".txt") and candidate.is_file())
    if not is_path:
        return raw, ""
    try:
        return candidate.read_bytes().strip(), str(candidate)
    except OSError:
        return b"", str(candidate)


def read_manifest(path: str | Path, config: DataConfig, labelled: bool = True) -> Manifest:
    """Reads every row; a bad row is kept (validation reports it), a bad file raises.

    Args:
        path: the CSV file; relative media paths are resolved against its folder.
        config: ``data.columns`` names the columns, ``data.text.source`` says
            whether a text cell is the text or a file holding it.
        labelled: require the label and split columns (training data); a
            manifest of inputs to predict needs only the id and media columns.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    columns = config.columns
    base = path.parent.resolve()
    # surrogateescape keeps non-UTF-8 bytes so that validation can name the record.
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        required = [columns.id, columns.label, columns.split] if labelled else [columns.id]
        target_columns = [t.column for t in config.targets[1:]]  # the primary's is the label column
        if labelled:
            required += target_columns
        missing = [c for c in required if c not in header]
        media = [c for c in (columns.image, columns.text, columns.audio) if c in header]
        if missing or not media:
            raise ManifestError(
                f"{path}: missing columns {missing or []}"
                f"{'' if media else ' and no media column'}; header is {header}"
            )
        records = []
        for row_number, row in enumerate(reader, start=1):
            text, text_path = _text_of(base, row.get(columns.text) or "", config.text.source)
            records.append(
                Record(
                    row=row_number,
                    id=(row.get(columns.id) or "").strip() or f"row{row_number}",
                    image=_resolve(base, row.get(columns.image) or ""),
                    text=text,
                    text_path=text_path,
                    audio=_resolve(base, row.get(columns.audio) or ""),
                    label=(row.get(columns.label) or "").strip(),
                    label_name=(row.get(columns.label_name) or "").strip(),
                    split=(row.get(columns.split) or "").strip().lower(),
                    targets={c: row.get(c) or "" for c in target_columns if c in header},
                )
            )
    return Manifest(path=path, records=records)


def label_names_of(manifest: Manifest, fixed: tuple[str, ...] = ()) -> list[str]:
    """Class names, index = label id.

    With ``fixed`` names (config) those are the classes. Otherwise integer
    labels give ids directly (names from the label_name column when present)
    and string labels are sorted; only labels seen in the train split count,
    so a test label never seen in training is reported as unknown.
    """
    if fixed:
        return list(fixed)
    train = [r for r in manifest.records if SPLIT_ALIASES.get(r.split) == TRAIN and r.label]
    integers = [r for r in train if r.label.lstrip("-").isdigit()]
    if integers:  # integer mode: a non-integer label is then unknown
        ids = {int(r.label) for r in integers if int(r.label) >= 0} or {0}
        names = {int(r.label): r.label_name for r in integers if r.label_name}
        return [names.get(i, str(i)) if i in ids else f"unused_{i}" for i in range(max(ids) + 1)]
    return sorted({r.label for r in train})


def label_id(record: Record, label_names: list[str]) -> int | None:
    """The record's class id, or None when the label is not a known class."""
    label = record.label
    if label.lstrip("-").isdigit():
        value = int(label)
        ok = 0 <= value < len(label_names) and not label_names[value].startswith("unused_")
        return value if ok else None
    return label_names.index(label) if label in label_names else None
