"""Training throughput: ``mmtf train``'s tf.data path vs a naive numpy path, and MFU.

Same model (``build_model`` from the same config), same examples. The naive
path loads every example with a Python loop (PIL + wave + numpy, see
input_pipeline.py), stacks numpy arrays and calls ``fit`` on them; ours
streams the TFRecord pipeline. Printed side by side: load time, steady-state
training examples/s (epochs after the first), and end-to-end wall time.

Then FLOPs and MFU of our path: forward FLOPs per example from the TF
profiler on the frozen inference graph (recurrent layers added
analytically; multimodal_tf.profiling), training FLOPs = 3x forward,
achieved FLOP/s = steady examples/s x training FLOPs, and MFU = that over a
float32 matmul peak (chained 2048x2048 matmuls through TF) measured just
before and after each model's run, the higher of the two. ``--config`` repeats; a config without a
manifest (the demo) trains on the synthetic demo set.

    python benchmarks/train.py [--config pipelines/emoji3.yaml ...] [--epochs 3] [--no-naive] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from input_pipeline import naive_features  # noqa: E402

from multimodal_tf import config as config_lib  # noqa: E402
from multimodal_tf import profiling  # noqa: E402
from multimodal_tf.compat import keras, tf  # noqa: E402
from multimodal_tf.data import features, pipeline  # noqa: E402
from multimodal_tf.data import manifest as manifest_lib  # noqa: E402
from multimodal_tf.data.cache import prepare_data  # noqa: E402
from multimodal_tf.data.synthetic import synthesize  # noqa: E402
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


def benchmark(config_path: str, overrides: list[str], epochs: int, naive: bool) -> dict:
    """One config: naive vs ours (``naive``), then FLOPs and MFU of ours."""
    config = config_lib.load([config_path], overrides)
    if not config.data.manifest:  # the demo config: mmtf demo's synthetic set
        manifest = synthesize(Path(tempfile.mkdtemp(prefix="mmtf-bench-")), num_examples=2400, seed=0)
        config = config_lib.load([config_path], [*overrides, f"data.manifest={manifest}"])
    metadata = prepare_data(config.data, progress=False)
    train_ids = set()
    for _, _, ids in pipeline.make_dataset(config, "train", training=False, metadata=metadata, with_ids=True):
        train_ids.update(i.decode() for i in ids.numpy())
    row = {"config": config_path, "count": len(train_ids), "batch": config.data.batch_size}

    if naive:
        start = time.perf_counter()
        x, y = naive_arrays(config, metadata, train_ids)
        row["naive_load"] = time.perf_counter() - start
        model, timer = compiled_model(config, metadata), EpochTimer()
        model.fit(
            x, y, batch_size=config.data.batch_size, epochs=epochs, verbose=0, callbacks=[timer], shuffle=True
        )
        row["naive_total"] = time.perf_counter() - start
        row["naive_rate"] = row["count"] * (len(timer.times) - 1) / sum(timer.times[1:])

    # Measured just before and after this model trains (the higher counts):
    # other jobs on the machine slow both alike.
    peaks = [profiling.matmul_peak(2048, chain=8, repeats=5)]
    row["load"] = os.getloadavg()[0]
    start = time.perf_counter()
    dataset = pipeline.make_dataset(config, "train", metadata=metadata)
    model, timer = compiled_model(config, metadata), EpochTimer()
    model.fit(dataset, epochs=epochs, verbose=0, callbacks=[timer])
    row["ours_total"] = time.perf_counter() - start
    row["ours_rate"] = row["count"] * (len(timer.times) - 1) / sum(timer.times[1:])
    row["ours_first"] = row["count"] / timer.times[0]
    row["peak"] = max(*peaks, profiling.matmul_peak(2048, chain=8, repeats=5))
    row["flops"] = profiling.forward_flops(model, features.model_feature_specs(config.data, config.model))
    row["mfu"] = row["ours_rate"] * row["flops"].train / row["peak"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", help="repeatable; default pipelines/emoji3.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no-naive", dest="naive", action="store_false", help="only our path and its MFU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    rows = [
        benchmark(path, args.set, args.epochs, args.naive)
        for path in args.config or [str(ROOT / "pipelines" / "emoji3.yaml")]
    ]
    for row in rows:
        print(
            f"config {row['config']}: {row['count']} training examples, batch {row['batch']}, {args.epochs} epochs"
        )
        if args.naive:
            print(f"{'path':<44}{'load s':>8}{'1st epoch ex/s':>16}{'steady ex/s':>13}{'total s':>9}")
            print(
                f"{'naive (Python loop -> numpy -> fit)':<44}{row['naive_load']:>8.1f}{'-':>16}"
                f"{row['naive_rate']:>13,.0f}{row['naive_total']:>9.1f}"
            )
            print(
                f"{'mmtf train path (TFRecords -> tf.data)':<44}{0.0:>8.1f}{row['ours_first']:>16,.0f}"
                f"{row['ours_rate']:>13,.0f}{row['ours_total']:>9.1f}"
            )
            print(
                f"ratio ours / naive: steady {row['ours_rate'] / row['naive_rate']:.2f}x, "
                f"end-to-end {row['naive_total'] / row['ours_total']:.2f}x faster"
            )
    print("\nFLOPs per example: TF profiler on the frozen forward graph (+ recurrent layers analytically);")
    print(
        "training = 3x forward; MFU = steady ex/s x training FLOPs / float32 matmul peak (max of before and after each model)"
    )
    print(
        f"{'config':<28}{'fwd MFLOP':>10}{'of it RNN':>10}{'train MFLOP':>12}{'steady ex/s':>12}"
        f"{'GFLOP/s':>9}{'peak GFLOP/s':>13}{'MFU':>8}{'load avg':>9}"
    )
    for row in rows:
        flops = row["flops"]
        print(
            f"{Path(row['config']).name:<28}{flops.forward / 1e6:>10.2f}{flops.recurrent / 1e6:>10.2f}"
            f"{flops.train / 1e6:>12.2f}{row['ours_rate']:>12,.0f}{row['ours_rate'] * flops.train / 1e9:>9.1f}"
            f"{row['peak'] / 1e9:>13.0f}{row['mfu']:>8.2%}{row['load']:>9.1f}"
        )


if __name__ == "__main__":
    main()
