"""Where a manifest's TFRecords live, and converting them on demand.

``mmtf train``, ``mmtf tune``, evaluation and export find a dataset's
TFRecords here: ``data.tfrecord_dir`` when set, otherwise a folder under
``$MMTF_CACHE_DIR`` (default ``.mmtf_cache``) keyed by the manifest's content
and the conversion settings, so a changed manifest or setting converts anew.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from multimodal_tf.config import DataConfig
from multimodal_tf.data import convert as convert_lib
from multimodal_tf.data.metadata import DatasetMetadata

CACHE_ENV, DEFAULT_CACHE = "MMTF_CACHE_DIR", ".mmtf_cache"


def default_tfrecord_dir(config: DataConfig) -> Path:
    """The TFRecord folder of ``config``'s manifest (``data.tfrecord_dir`` wins)."""
    if config.tfrecord_dir:
        return Path(config.tfrecord_dir)
    manifest = Path(config.manifest)
    root = Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))
    key = convert_lib.source_fingerprint(manifest, config)[:10]
    return root / "tfrecords" / f"{manifest.resolve().parent.name}-{key}"


def prepare_data(config: DataConfig, progress: bool = True) -> DatasetMetadata:
    """Converts the manifest to TFRecords unless an up-to-date conversion exists.

    Bad records are skipped (``mmtf data validate`` lists them). Without a
    manifest, the metadata of ``data.tfrecord_dir`` is read as it is.
    """
    directory = default_tfrecord_dir(config)
    if not config.manifest:
        return DatasetMetadata.load(directory)
    # Tasks of a local cluster (mmtf launch) convert the same manifest at the
    # same time: one converts, the others wait and then find it up to date.
    lock_path = Path(f"{directory}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return convert_lib.convert(config.manifest, directory, config, on_error="skip", progress=progress)
