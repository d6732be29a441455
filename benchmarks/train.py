"""Training throughput: ``mmtf train``'s tf.data path vs a naive numpy path.

Same model (``build_model`` from the same config), same examples. The naive
path loads every example with a Python loop (PIL + wave + numpy, see
input_pipeline.py), stacks numpy arrays and calls ``fit`` on them; ours
streams the TFRecord pipeline. Printed side by side: load time, steady-state
training examples/s (epochs after the first), and end-to-end wall time.

    python benchmarks/train.py [--config pipelines/emoji3.yaml] [--epochs 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from input_pipeline import naive_features  # noqa: E402

from multimodal_tf import config as config_lib  # noqa: E402
from multimodal_tf.compat import keras, tf  # noqa: E402
from multimodal_tf.data import manifest as manifest_lib  # noqa: E402
from multimodal_tf.data import pipeline
from multimodal_tf.data.cache import prepare_data  # noqa: E402
from multimodal_tf.data.text import vocabulary_size  # noqa: E402
from multimodal_tf.models import build_model, loss_for  # noqa: E402
from multimodal_tf.recipe import set_seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def compiled_model(config, metadata):
    set_seed(config.train.seed)
    model = build_model(config, metadata.num_classes, vocabulary_size(config.data.text, metadata.vocabulary))
    model.compile(keras.optimizers.Adam(config.train.learning_rate), loss_for(config), ["accuracy"])
    return model


def naive_arrays(config, metadata, train_ids):
    manifest = manifest_lib.read_manifest(config.data.manifest, config.data)
    records = [r for r in manifest.records if r.id in train_ids]
    labels = {name: i for i, name in enumerate(metadata.label_names)}
    vocabulary = {token: i for i, token in enumerate(metadata.vocabulary)}
    audio = config.data.audio
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(
        audio.num_mel_bins,
        audio.fft_length // 2 + 1,
        audio.sample_rate,
        audio.lower_edge_hertz,
        audio.upper_edge_hertz,
    ).numpy()
    images, tokens, spectra, y = [], [], [], []
    for image, token_ids, spectrum, _ in naive_features(records, config.data, vocabulary, mel_matrix):
        images.append(image[..., : config.data.image.channels])
        tokens.append(token_ids)
        spectra.append(spectrum)
    for record in records:
        y.append(manifest_lib.label_id(record, list(labels)))
    x = {"image": np.stack(images), "text": np.stack(tokens), "audio": np.stack(spectra)}
    for modality, record_field in (("image", "image"), ("text", "text"), ("audio", "audio")):
        x[f"{modality}_present"] = np.array(
            [float(bool(getattr(r, record_field))) for r in records], np.float32
        )
    keep = set(config.model.modalities)
    x = {k: v for k, v in x.items() if k.split("_")[0] in keep}
    return x, np.array(y)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "pipelines" / "emoji3.yaml"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    config = config_lib.load([args.config], args.set)
    metadata = prepare_data(config.data, progress=False)
    train_ids = set()
    for _, _, ids in pipeline.make_dataset(config, "train", training=False, metadata=metadata, with_ids=True):
        train_ids.update(i.decode() for i in ids.numpy())
    count = len(train_ids)

    start = time.perf_counter()
    x, y = naive_arrays(config, metadata, train_ids)
    naive_load = time.perf_counter() - start
    model, timer = compiled_model(config, metadata), EpochTimer()
    model.fit(
        x,
        y,
        batch_size=config.data.batch_size,
        epochs=args.epochs,
        verbose=0,
        callbacks=[timer],
        shuffle=True,
    )
    naive_total = time.perf_counter() - start
    naive_rate = count * (len(timer.times) - 1) / sum(timer.times[1:])

    start = time.perf_counter()
    dataset = pipeline.make_dataset(config, "train", metadata=metadata)
    model, timer = compiled_model(config, metadata), EpochTimer()
    model.fit(dataset, epochs=args.epochs, verbose=0, callbacks=[timer])
    ours_total = time.perf_counter() - start
    ours_rate = count * (len(timer.times) - 1) / sum(timer.times[1:])
    ours_first = count / timer.times[0]

    print(
        f"config {args.config}: {count} training examples, batch {config.data.batch_size}, {args.epochs} epochs"
    )
    print(f"{'path':<44}{'load s':>8}{'1st epoch ex/s':>16}{'steady ex/s':>13}{'total s':>9}")
    print(
        f"{'naive (Python loop -> numpy -> fit)':<44}{naive_load:>8.1f}{'-':>16}{naive_rate:>13,.0f}{naive_total:>9.1f}"
    )
    print(
        f"{'mmtf train path (TFRecords -> tf.data)':<44}{0.0:>8.1f}{ours_first:>16,.0f}{ours_rate:>13,.0f}{ours_total:>9.1f}"
    )
    print(
        f"ratio ours / naive: steady {ours_rate / naive_rate:.2f}x, end-to-end {naive_total / ours_total:.2f}x faster"
    )


if __name__ == "__main__":
    main()
