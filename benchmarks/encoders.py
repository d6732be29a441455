"""Per-encoder cost: training examples/s, batch-1 serving latency and parameters, side by side.

Each encoder family runs alone (one modality, ``concat`` fusion, the demo
pipeline's sizes: 32 px images, 12 tokens, 1 s clips) on random inputs of the
model's specs, in one process, one after another:

- **train ex/s**: ``train_on_batch`` steps after two warm-up steps;
- **serve p50**: the export's ``serving_default`` function traced in
  process (raw PNG / UTF-8 text / WAV bytes in: decoding, tokenizing and
  log-mel included), batch 1, median of ``--calls`` calls;
- **params**: the encoder layer's weights, total and trainable.

Pretrained families run on seeded random files in the real formats
(``multimodal_tf.testing_bert``, ``testing_pretrained``): BERT at the tiny
test size and at BERT-Tiny's size (``uncased_L-2_H-128_A-2``: 2 layers,
hidden 128, 2 heads, a 30,522-token vocabulary), Keras Applications
backbones with random weights at 32 px. Ratios are against the modality's
first row.

    python benchmarks/encoders.py [--steps 20] [--calls 50] [--batch-size 32] [--only text/bert-mini]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# serving_helpers imports TensorFlow (through tensorflow_serving) before
# multimodal_tf could set this: bert-for-tf2 needs Keras 2 from the start.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from serving_helpers import png_bytes, wav_bytes  # noqa: E402

from multimodal_tf import config as config_lib  # noqa: E402
from multimodal_tf.compat import keras, tf  # noqa: E402
from multimodal_tf.data import features  # noqa: E402
from multimodal_tf.data.preprocessing import Preprocessor  # noqa: E402
from multimodal_tf.export import ServingModule  # noqa: E402
from multimodal_tf.models import build_model, loss_for  # noqa: E402
from multimodal_tf.testing import random_features  # noqa: E402
from multimodal_tf.testing_bert import (  # noqa: E402
    TINY_BERT_CONFIG,
    TINY_VOCABULARY,
    write_tiny_bert_checkpoint,
)
from multimodal_tf.testing_pretrained import write_tiny_yamnet  # noqa: E402

VOCABULARY = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cat", "dog", "bird", "sky")
# BERT-Tiny (Turc et al. 2019, Google's uncased_L-2_H-128_A-2): its config, with
# filler word pieces after the test vocabulary up to BERT's 30,522 entries.
BERT_MINI_CONFIG = dict(
    TINY_BERT_CONFIG,
    hidden_size=128,
    intermediate_size=512,
    num_attention_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=512,
    vocab_size=30522,
)


def variants(files: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Row name -> overrides of the demo pipeline (its modality first)."""
    application = ("model.image_encoder.name=image/keras_application", "model.image_encoder.input_size=32")
    bert = ("model.text_encoder.name=text/bert", "model.text_encoder.output_dim=32")
    return {
        "image/cnn": ("model.modalities=[image]",),
        "image/keras_application MobileNetV3Small": (
            "model.modalities=[image]",
            *application,
            "model.image_encoder.architecture=MobileNetV3Small",
        ),
        "image/keras_application ResNet50V2": (
            "model.modalities=[image]",
            *application,
            "model.image_encoder.architecture=ResNet50V2",
        ),
        "text/lstm": ("model.modalities=[text]",),
        "text/bow": ("model.modalities=[text]", "model.text_encoder.name=text/bow"),
        "text/bert tiny (L-2 H-16)": (
            "model.modalities=[text]",
            *bert,
            f"model.text_encoder.checkpoint_dir={files['bert_tiny']}",
        ),
        "text/bert mini (L-2 H-128)": (
            "model.modalities=[text]",
            *bert,
            f"model.text_encoder.checkpoint_dir={files['bert_mini']}",
        ),
        "audio/cnn": ("model.modalities=[audio]",),
        "audio/stats": ("model.modalities=[audio]", "model.audio_encoder.name=audio/stats"),
        "audio/saved_model tiny": (
            "model.modalities=[audio]",
            "model.audio_encoder.name=audio/saved_model",
            f"model.audio_encoder.path={files['yamnet']}",
            "model.audio_encoder.signature=",
            "model.audio_encoder.input_key=",
            "model.audio_encoder.output_key='1'",  # quoted: a string key, not YAML's int
        ),
    }


def write_files(directory: Path) -> dict[str, str]:
    vocabulary = TINY_VOCABULARY + tuple(f"w{i}" for i in range(30522 - len(TINY_VOCABULARY)))
    return {
        "bert_tiny": str(write_tiny_bert_checkpoint(directory / "bert_tiny")),
        "bert_mini": str(write_tiny_bert_checkpoint(directory / "bert_mini", BERT_MINI_CONFIG, vocabulary)),
        "yamnet": str(write_tiny_yamnet(directory / "yamnet")),
    }


def parameter_counts(encoder) -> tuple[int, int]:
    """(total, trainable) parameters, a wrapped SavedModel's variables included (Keras does not count them)."""
    size = lambda variables: sum(int(np.prod(v.shape)) for v in variables)  # noqa: E731
    function = getattr(encoder, "_function", None)  # audio/saved_model: the wrapped model's function
    captured = {id(w): w for w in encoder.weights}
    extra = []
    for concrete in getattr(function, "concrete_functions", None) or ([function] if function else []):
        for variable in concrete.variables:
            if id(variable) not in captured:
                captured[id(variable)] = variable
                extra.append(variable)
    unfrozen = not getattr(encoder, "freeze", True)
    trainable = encoder.trainable_weights + ([v for v in extra if v.trainable] if unfrozen else [])
    return size(encoder.weights) + size(extra), size(trainable)


def raw_batch_of_one(modality: str) -> dict[str, tf.Tensor]:
    make = {
        "image": lambda: png_bytes(0, size=32),
        "text": lambda: b"the red cat is happy",
        "audio": wav_bytes,
    }
    return {modality: tf.constant([make[modality]()])}


def measure(name: str, overrides: tuple[str, ...], args) -> dict:
    config = config_lib.load([ROOT / "multimodal_tf" / "configs" / "demo.yaml"], overrides)
    modality = config.model.modalities[0]
    keras.utils.set_random_seed(0)
    model = build_model(config, num_classes=8, vocab_size=len(VOCABULARY))
    model.compile(keras.optimizers.Adam(1e-3), loss_for(config))
    # Token ids below 12: valid in every vocabulary here (BERT's included).
    inputs = random_features(config, batch_size=args.batch_size, vocab_size=len(VOCABULARY))
    targets = np.random.default_rng(0).integers(0, 8, args.batch_size)
    for _ in range(2):  # tracing and the first optimizer step
        model.train_on_batch(inputs, targets)
    start = time.perf_counter()
    for _ in range(args.steps):
        model.train_on_batch(inputs, targets)
    train_rate = args.steps * args.batch_size / (time.perf_counter() - start)

    preprocessor = Preprocessor(config.data, VOCABULARY, config.model)
    specs = features.model_feature_specs(config.data, config.model)
    module = ServingModule(model, preprocessor, [str(i) for i in range(8)], "multiclass", specs)
    serve = module.serve_raw.get_concrete_function(
        {modality: tf.TensorSpec([None], tf.string, name=modality)}
    )
    raw = raw_batch_of_one(modality)
    serve(raw)  # warm-up
    seconds = []
    for _ in range(args.calls):
        start = time.perf_counter()
        serve(raw)["probabilities"].numpy()
        seconds.append(time.perf_counter() - start)
    encoder = model.get_layer(f"{modality}_encoder")
    params, trainable = parameter_counts(encoder)
    return {
        "name": name,
        "modality": modality,
        "train": train_rate,
        "p50_ms": 1000 * statistics.median(seconds),
        "params": params,
        "trainable": trainable,
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'encoder':44} {'train ex/s':>10} {'vs first':>8} {'serve p50 ms':>12} {'vs first':>8}"
        f" {'params':>11} {'trainable':>11}"
    )
    first: dict[str, dict] = {}
    for row in rows:
        base = first.setdefault(row["modality"], row)
        print(
            f"{row['name']:44} {row['train']:10.0f} {row['train'] / base['train']:7.2f}x"
            f" {row['p50_ms']:12.2f} {row['p50_ms'] / base['p50_ms']:7.2f}x"
            f" {row['params']:11,d} {row['trainable']:11,d}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per encoder")
    parser.add_argument("--calls", type=int, default=50, help="timed batch-1 serving calls per encoder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only", action="append", help="run only rows whose name starts with this")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, overrides in variants(write_files(Path(directory))).items():
            if args.only and not any(name.startswith(prefix) for prefix in args.only):
                continue
            start = time.perf_counter()
            rows.append(measure(name, overrides, args))
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(f"TensorFlow {tf.__version__}, batch {args.batch_size}, {args.steps} steps, {args.calls} calls")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
