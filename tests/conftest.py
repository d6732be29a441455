"""Test setup: two logical CPU devices (for MirroredStrategy) and shared fixtures."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from multimodal_tf.compat import tf

# Must run before TF initialises its devices: split the host CPU in two so
# MirroredStrategy has two replicas on a GPU-less machine.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
except RuntimeError:  # already initialised (e.g. when imported twice)
    pass

SHARED_DATA = Path(
    os.environ.get("MMTF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def shared_manifest(name: str) -> Path:
    """Path of a real dataset's manifest, or skip the test with a clear reason."""
    manifest = SHARED_DATA / name / "manifest.csv"
    if not manifest.exists():
        pytest.skip(f"real dataset {name!r} not found at {manifest} (set MMTF_SHARED_DATA)")
    return manifest


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """TFRecord conversions of one test session share one cache folder."""
    os.environ["MMTF_CACHE_DIR"] = str(tmp_path_factory.mktemp("mmtf_cache"))
    yield


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory) -> Path:
    """A small synthetic three-modality dataset (deterministic)."""
    from multimodal_tf.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), num_examples=240, seed=1)


@pytest.fixture(scope="session")
def two_class_manifest(synth_manifest, tmp_path_factory):
    """Classes 0 and 1 of ``synth_manifest``, class 1 kept in one train row of four (~4:1).

    Imbalanced (for class weights) and two-class (for the binary head).
    """
    rows = list(csv.DictReader(open(synth_manifest, encoding="utf-8")))
    kept, seen = [], 0
    for row in rows:
        if row["label"] == "0" or (row["label"] == "1" and row["split"] == "test"):
            kept.append(row)
        elif row["label"] == "1":
            seen += 1
            if seen % 4 == 0:
                kept.append(row)
    out = tmp_path_factory.mktemp("two_class") / "manifest.csv"
    for row in kept:  # media paths relative to the new manifest's folder
        for column in ("image", "audio"):
            row[column] = str(synth_manifest.parent / row[column]) if row[column] else ""
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return out


def one_val_example_manifest(manifest: Path, out: Path) -> tuple[Path, str]:
    """Copy of ``manifest`` whose val split is its first row only; returns (path, that row's id)."""
    import csv

    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    for index, row in enumerate(rows):
        row["split"] = "val" if index == 0 else ("test" if row["split"] == "test" else "train")
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out, rows[0]["id"]
