"""A config inferred from a manifest alone (``mmtf train --manifest M.csv`` without ``--config``).

:func:`infer_config` turns a :class:`~multimodal_tf.data.profile.DatasetProfile`
(``data.profile.profile_manifest``: what the manifest holds) into an
:class:`ExperimentConfig` by rules stated in docs/training.md ("What the
automatic run infers"): principles tied to the data's size and shape, not
settings tuned to one dataset. :func:`explain` lists every choice and why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from multimodal_tf import config as config_lib
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data.profile import DatasetProfile, ProfileError

# === The one place that picks the text encoder and calibration ===
# TF-IDF words (1-2) + character n-grams (2-4) into a weight-decayed linear
# projection: the classic small-data text baseline, which beats small neural
# text encoders trained from scratch on a few thousand examples. Its fields
# are the encoder's own defaults (docs/models.md), not tuned to any set.
TEXT_ENCODER: dict = {"name": "text/tfidf", "output_dim": 64}
# Temperature scaling fit on validation and carried into the export, so the
# automatic path's probabilities are calibrated (train.calibration).
CALIBRATION: dict = {"train.calibration": "temperature"}

IMBALANCE_RATIO = 3.0  # largest / smallest class count above which classes are weighted
SMALL_DATA = 5000  # training examples below which the small, low-capacity encoders are used


def _round_up(value: float, step: float) -> float:
    return math.ceil(value / step - 1e-9) * step


def _image_rules(profile: DatasetProfile) -> list[tuple[str, str]]:
    stats, n = profile.image, profile.train_examples
    # Input pixels grow with the data: a small CNN on a few thousand images
    # gains nothing from more pixels than it can learn filters for.
    cap = 32 if n < SMALL_DATA else 64 if n < 50_000 else 128
    scale = min(1.0, cap / max(stats["median_height"], stats["median_width"]))
    height = max(8, round(stats["median_height"] * scale))
    width = max(8, round(stats["median_width"] * scale))
    grey = stats["grey_share"] >= 0.95
    rules = [
        (
            f"data.image.height={height}",
            f"median image {stats['median_height']:.0f} px high, capped at {cap} px for {n} examples",
        ),
        (
            f"data.image.width={width}",
            f"median width {stats['median_width']:.0f} px, same scale (aspect kept)",
        ),
        (f"data.image.channels={1 if grey else 3}", f"{stats['grey_share']:.0%} of sampled images are grey"),
        ("model.image_encoder.name=image/cnn", "a small CNN: few parameters for small data"),
        (f"model.image_encoder.width={16 if n < SMALL_DATA else 32}", "filters grow with the data"),
        (
            f"model.image_encoder.depth={2 if max(height, width) <= 32 else 3}",
            "one pooling block per doubling of the side",
        ),
        ("model.image_encoder.output_dim=64", ""),
        ("model.image_encoder.dropout_rate=0.2", ""),
    ]
    if not grey:
        # A joint colour histogram (bins**3 cells) captures palette, which a
        # small CNN misses; keep >= 4 training images per cell.
        bins = max(b for b in range(2, 9) if b**3 <= max(8, n / 4))
        rules.append(
            (
                f"model.image_encoder.colour_bins={bins}",
                f"{bins}^3 colour cells, >= 4 training images per cell",
            )
        )
    return rules


def _text_rules(profile: DatasetProfile) -> list[tuple[str, str]]:
    stats, n = profile.text, profile.train_examples
    max_tokens = int(min(512, max(8, _round_up(stats["p95_tokens"], 8))))
    buckets = int(min(2**18, max(2**12, 2 ** math.ceil(math.log2(4 * stats["distinct_tokens"])))))
    low, high = stats["ngram_range"]
    script = "non-space-delimited script" if low == 1 else "space-delimited words"
    rules = [
        (
            "data.text.tokenizer=ngrams",
            f"hashed words + character n-grams: {stats['vocabulary_growth']:.0%} of later words are unseen earlier, and n-grams share across them",
        ),
        (f"data.text.ngram_range=[{low}, {high}]", script),
        (
            f"data.text.max_tokens={max_tokens}",
            f"95th percentile of tokens per text is {stats['p95_tokens']:.0f}",
        ),
        (
            f"data.text.hash_buckets={buckets}",
            f"~4x the {stats['distinct_tokens']} distinct tokens (few collisions)",
        ),
    ]
    reason = f"TF-IDF words + character n-grams, the small-data baseline, for {n} examples (autoconfig.TEXT_ENCODER)"
    rules += [(f"model.text_encoder.{k}={v}", reason if k == "name" else "") for k, v in TEXT_ENCODER.items()]
    return rules


def _audio_rules(profile: DatasetProfile) -> list[tuple[str, str]]:
    stats, n = profile.audio, profile.train_examples
    # The 90th percentile keeps almost all of almost every clip; longer clips
    # are cut (cost grows with duration).
    seconds = min(10.0, max(0.5, _round_up(stats["p90_seconds"], 0.25)))
    small = n < SMALL_DATA
    return [
        (
            f"data.audio.duration_seconds={seconds}",
            f"90th percentile clip length {stats['p90_seconds']:.2f} s (capped at 10 s)",
        ),
        ("data.audio.num_mel_bins=40", ""),
        (
            f"model.audio_encoder.name={'audio/stats' if small else 'audio/cnn'}",
            "band statistics of the log-mel (classic clip features) below 5,000 examples"
            if small
            else "a CNN over the log-mel for larger data",
        ),
        ("model.audio_encoder.width=64" if small else "model.audio_encoder.width=16", ""),
        ("model.audio_encoder.depth=1" if small else "model.audio_encoder.depth=3", ""),
        ("model.audio_encoder.output_dim=64", ""),
        ("model.audio_encoder.dropout_rate=0.2", ""),
    ]


def _training_rules(profile: DatasetProfile, output_dir: str) -> list[tuple[str, str]]:
    n, k = profile.train_examples, len(profile.class_counts)
    rules = [
        (f"train.output_dir={json.dumps(str(output_dir))}", ""),
        (
            f"data.batch_size={32 if n < 2000 else 64}",
            f"{'below' if n < 2000 else 'from'} 2,000 examples ({'more steps per epoch' if n < 2000 else 'the default'})",
        ),
        ("train.epochs=40", "an upper bound: early stopping and the time budget end runs sooner"),
        ("train.early_stopping_patience=6", ""),
        ("train.learning_rate=0.002", ""),
        (
            "train.monitor=val_loss",
            "a small validation set's loss picks checkpoints more reliably than its accuracy",
        ),
        ("train.verbose=0", ""),
        ("model.head.hidden_units=[64]", ""),
        ("model.head.dropout_rate=0.3", ""),
        ("model.fusion.name=concat", "the intermediate-fusion candidate; late fusion is built by stacking"),
    ]
    weighted = profile.imbalance > IMBALANCE_RATIO
    rules.append(
        (
            f"train.class_weights={'balanced' if weighted else 'none'}",
            f"largest/smallest class count {profile.imbalance:.1f} ({'>' if weighted else '<='} {IMBALANCE_RATIO:g})",
        )
    )
    if not profile.has_val:
        # Enough validation examples to rank candidates (~20 per class), never
        # more than a quarter of the training rows.
        fraction = round(min(0.25, max(0.1, 20 * k / max(1, n))), 3)
        rules += [
            (
                f"data.validation_fraction={fraction}",
                f"no val split: ~20 examples per class of {k}, 10-25% of train",
            ),
            ("data.validation_split=stratified", "every class in validation, in proportion"),
        ]
    modalities = profile.modalities
    rules.append(
        (
            f"model.modalities=[{', '.join(modalities)}]",
            f"train rows with data: {', '.join(f'{m} {profile.presence[m]:.0%}' for m in modalities)}",
        )
    )
    if len(modalities) > 1:
        rules += [(f"model.modality_dropout.{m}=0.2", "") for m in modalities]
    rules += [(f"{key}={value}", "autoconfig.CALIBRATION") for key, value in CALIBRATION.items()]
    return rules


def inference_rules(profile: DatasetProfile, output_dir: str = "runs/auto") -> list[tuple[str, str]]:
    """``(override, reason)`` pairs, in the order they are applied to the defaults."""
    if len(profile.class_counts) < 2:
        raise ProfileError(
            f"{profile.manifest}: needs at least 2 classes in the train split, got {list(profile.class_counts)}"
        )
    if not profile.modalities:
        raise ProfileError(f"{profile.manifest}: no image, text or audio data in the train rows")
    name = Path(profile.manifest).resolve().parent.name or "auto"
    rules = [(f"name={json.dumps(name)}", ""), (f"data.manifest={json.dumps(str(profile.manifest))}", "")]
    for modality, make in (("image", _image_rules), ("text", _text_rules), ("audio", _audio_rules)):
        if modality in profile.modalities:
            rules += make(profile)
    return rules + _training_rules(profile, output_dir)


def infer_config(profile: DatasetProfile, output_dir: str = "runs/auto") -> ExperimentConfig:
    """The experiment config :func:`inference_rules` describe (defaults, then the rules)."""
    return config_lib.load((), [override for override, _ in inference_rules(profile, output_dir)])


def explain(profile: DatasetProfile, output_dir: str = "runs/auto") -> str:
    """The inferred settings with their reasons, one per line (printed by ``mmtf train --manifest``)."""
    lines = [
        f"inferred from {profile.manifest} ({profile.train_examples} train rows, {len(profile.class_counts)} classes):"
    ]
    for override, reason in inference_rules(profile, output_dir):
        if reason:
            lines.append(f"  {override:<42} {reason}")
    return "\n".join(lines)
