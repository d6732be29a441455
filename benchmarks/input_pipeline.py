"""Input pipeline throughput: our tf.data path vs a naive per-example Python loop.

Both produce the same features (image resized to the configured size and
scaled, WordPiece-like token ids padded, log-mel spectrogram) in batches, on
the same dataset, measured side by side in one run. The tf.data path is
measured without caching so every epoch decodes again.

    python benchmarks/input_pipeline.py [--manifest ../shared/data/emoji3/manifest.csv]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
from PIL import Image

from multimodal_tf.compat import tf
from multimodal_tf.config import DataConfig, ExperimentConfig
from multimodal_tf.data import convert, pipeline
from multimodal_tf.data import manifest as manifest_lib

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "emoji3" / "manifest.csv"


def naive_features(records, config: DataConfig, vocabulary: dict, mel_matrix: np.ndarray):
    """One example at a time with PIL + wave + numpy, as a first script would."""
    audio = config.audio
    samples = int(audio.sample_rate * audio.duration_seconds)
    window = np.hanning(audio.frame_length + 1)[:-1].astype(np.float32)
    for record in records:
        image = np.zeros((config.image.height, config.image.width, 3), np.float32)
        if record.image:
            pil = Image.open(record.image).convert("RGB").resize((config.image.width, config.image.height))
            image = np.asarray(pil, np.float32) / 255.0
        tokens = np.zeros(config.text.max_tokens, np.int64)
        words = record.text.decode("utf-8").lower().split()[: config.text.max_tokens]
        tokens[: len(words)] = [vocabulary.get(w, 1) for w in words]
        spectrum = np.zeros(
            (1 + (samples - audio.frame_length) // audio.frame_step, audio.num_mel_bins), np.float32
        )
        if record.audio:
            with wave.open(record.audio) as w:
                raw = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
            signal = np.zeros(samples, np.float32)
            mono = raw.mean(-1)[:samples] / 32768.0
            signal[: len(mono)] = mono
            frames = np.stack(
                [
                    signal[i : i + audio.frame_length] * window
                    for i in range(0, samples - audio.frame_length + 1, audio.frame_step)
                ]
            )
            magnitude = np.abs(np.fft.rfft(frames, audio.fft_length))
            spectrum = np.log(magnitude @ mel_matrix + 1e-6)
        yield image, tokens, spectrum, record.label


def run_naive(records, config, vocabulary, mel_matrix) -> float:
    start, count, batch = time.perf_counter(), 0, []
    for example in naive_features(records, config, vocabulary, mel_matrix):
        batch.append(example)
        if len(batch) == config.batch_size:
            [np.stack(parts) for parts in zip(*batch, strict=False)]
            count += len(batch)
            batch = []
    count += len(batch)
    return count / (time.perf_counter() - start)


def run_tfdata(config: ExperimentConfig, metadata, epochs: int) -> float:
    """Examples/s over ``epochs`` epochs (after the first, when caching)."""
    dataset = pipeline.make_dataset(config, "train", metadata=metadata)
    if config.data.cache:  # fill the cache: steady state is what later epochs see
        for _ in dataset:
            pass
    for _ in dataset.take(1):  # warm up (graph tracing)
        pass
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for _, labels in dataset:
            count += int(labels.shape[0])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    data = DataConfig(manifest=args.manifest, tfrecord_dir=tempfile.mkdtemp(prefix="bench_tfr_"), cache=False)
    data = dataclasses.replace(data, image=dataclasses.replace(data.image, height=64, width=64))
    config = ExperimentConfig(data=data)
    metadata = convert.convert(args.manifest, data.tfrecord_dir, data, progress=False)
    manifest = manifest_lib.read_manifest(args.manifest, data)
    train_ids = set()
    for _, _, ids in pipeline.make_dataset(config, "train", training=False, metadata=metadata, with_ids=True):
        train_ids.update(i.decode() for i in ids.numpy())
    records = [r for r in manifest.records if r.id in train_ids]
    vocabulary = {token: i for i, token in enumerate(metadata.vocabulary)}
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(
        data.audio.num_mel_bins,
        data.audio.fft_length // 2 + 1,
        data.audio.sample_rate,
        data.audio.lower_edge_hertz,
        data.audio.upper_edge_hertz,
    ).numpy()
    naive = run_naive(records, data, vocabulary, mel_matrix)
    ours = run_tfdata(config, metadata, args.epochs)
    cached_config = dataclasses.replace(config, data=dataclasses.replace(data, cache=True))
    cached = run_tfdata(cached_config, metadata, args.epochs)
    print(
        f"dataset: {args.manifest} ({len(records)} training examples, batch {data.batch_size}, 64x64 images)"
    )
    print(f"{'path':<40}{'examples/s':>12}")
    print(f"{'naive (PIL + wave + numpy loop)':<40}{naive:>12,.0f}")
    print(f"{'tf.data TFRecord pipeline (no cache)':<40}{ours:>12,.0f}")
    print(f"{'tf.data, cached (epochs after the 1st)':<40}{cached:>12,.0f}")
    print(f"ratio tf.data / naive: {ours / naive:.1f}x decoding every epoch, {cached / naive:.1f}x cached")


if __name__ == "__main__":
    main()
