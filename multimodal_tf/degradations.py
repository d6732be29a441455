"""Input degradations for the robustness report (MultiBench's imperfections).

Each degradation works on one modality's *decoded* input, the form a sensor
or a user hands over before any feature extraction: image pixels (float32
[B, H, W, C] in [0, 1]), mono waveforms (float32 [B, samples]) and raw UTF-8
text ([B] strings). Randomness comes from stateless ops (images, audio) or a
NumPy generator (text) seeded by ``(seed, degradation name, example id)``, so
a degraded example does not depend on batching, order or the other levels.

Level 0 of every degradation (the clean level) returns its input unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
import tensorflow as tf

from multimodal_tf.config import MODALITIES

# Lower-case letters: what a typo inserts or substitutes.
TYPO_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TYPO_OPERATIONS = ("insert", "delete", "substitute", "swap")
# Gaussian kernel radius in standard deviations (scipy.ndimage's default truncate).
BLUR_TRUNCATE = 4.0


@dataclasses.dataclass(frozen=True)
class Degradation:
    """One kind of imperfection and its increasing severity levels.

    Attributes:
        name: ``"<modality>/<kind>"``, e.g. ``"image/gaussian_noise"``.
        modality: the modality it degrades.
        levels: severities, clean first (``math.inf`` dB for the SNR).
        unit: what a level measures (for tables and plot axes).
    """

    name: str
    modality: str
    levels: tuple[float, ...]
    unit: str

    @property
    def kind(self) -> str:
        return self.name.split("/", 1)[1]

    def label(self, level: float) -> str:
        if self.kind == "white_noise":
            return "clean" if math.isinf(level) else f"{level:g} dB"
        return f"{level:g}"

    def is_clean(self, level: float) -> bool:
        return level == self.levels[0]


def _catalogue() -> dict[str, Degradation]:
    kinds = [
        ("image", "gaussian_noise", (0.0, 0.05, 0.1, 0.2, 0.3), "noise sigma ([0, 1] pixels)"),
        ("image", "gaussian_blur", (0.0, 0.5, 1.0, 2.0), "blur sigma (pixels)"),
        ("image", "occlusion", (0.0, 0.1, 0.25, 0.5), "occluded area fraction"),
        ("audio", "white_noise", (math.inf, 20.0, 10.0, 0.0), "SNR (dB)"),
        ("audio", "time_shift", (0.0, 0.1, 0.25, 0.5), "shift (fraction of the clip)"),
        ("text", "typos", (0.0, 0.05, 0.1, 0.2), "typo rate (per character)"),
        ("text", "word_dropout", (0.0, 0.1, 0.25, 0.5), "word dropout rate"),
    ]
    kinds += [(m, "missing", (0.0, 0.25, 0.5, 1.0), "fraction of examples missing it") for m in MODALITIES]
    return {f"{m}/{k}": Degradation(f"{m}/{k}", m, levels, unit) for m, k, levels, unit in kinds}


DEGRADATIONS = _catalogue()


def get(name: str) -> Degradation:
    """The degradation called ``name``; an unknown name lists the known ones."""
    if name not in DEGRADATIONS:
        raise ValueError(f"degradations: unknown degradation {name!r}; known: {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[name]


def example_seeds(ids: tf.Tensor, seed: int, name: str) -> tf.Tensor:
    """[B] example ids -> [B, 2] int64 stateless seeds of ``(seed, name, id)``."""
    first = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)
    second = tf.strings.to_hash_bucket_fast(ids, 2**31 - 1)
    return tf.stack([tf.fill(tf.shape(second), tf.constant(first, tf.int64)), second], axis=1)


def _per_example(seeds: tf.Tensor, draw) -> tf.Tensor:
    """Stacks ``draw(seed)`` over the [B, 2] seeds (one random stream per example)."""
    return tf.map_fn(draw, seeds, fn_output_signature=tf.float32)


# === Images: float32 [B, H, W, C] in [0, 1] ===


def gaussian_noise(pixels: tf.Tensor, sigma: float, seeds: tf.Tensor) -> tf.Tensor:
    """Adds N(0, sigma^2) per pixel and channel, then clips to [0, 1]."""
    shape = tf.shape(pixels)[1:]
    noise = _per_example(seeds, lambda s: tf.random.stateless_normal(shape, s))
    return tf.clip_by_value(pixels + sigma * noise, 0.0, 1.0)


def gaussian_kernel(sigma: float, max_radius: int) -> np.ndarray:
    """Normalised 1-D Gaussian of radius ``int(4 sigma + 0.5)`` (at most ``max_radius``)."""
    radius = min(int(BLUR_TRUNCATE * sigma + 0.5), max_radius)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(pixels: tf.Tensor, sigma: float) -> tf.Tensor:
    """Separable Gaussian blur with mirrored edges (scipy.ndimage ``mode="reflect"``)."""
    height, width, channels = pixels.shape[1:]
    kernel = gaussian_kernel(sigma, min(height, width))
    radius = len(kernel) // 2
    for axis in (1, 2):
        paddings = [[0, 0], [0, 0], [0, 0], [0, 0]]
        paddings[axis] = [radius, radius]
        shape = [len(kernel), 1] if axis == 1 else [1, len(kernel)]
        weights = tf.tile(tf.reshape(kernel, shape + [1, 1]), [1, 1, channels, 1])  # [kh, kw, C, 1]
        padded = tf.pad(pixels, paddings, mode="SYMMETRIC")
        pixels = tf.nn.depthwise_conv2d(padded, weights, strides=[1, 1, 1, 1], padding="VALID")
    return pixels


def occlusion_side(area_fraction: float, height: int, width: int) -> int:
    """Side of the square patch covering ``area_fraction`` of the image."""
    return min(int(round(math.sqrt(area_fraction * height * width))), height, width)


def occlusion(pixels: tf.Tensor, area_fraction: float, seeds: tf.Tensor) -> tf.Tensor:
    """Blacks out one square patch (side ``occlusion_side``) at a random place."""
    height, width = pixels.shape[1:3]
    side = occlusion_side(area_fraction, height, width)
    corner = tf.map_fn(
        lambda s: tf.random.stateless_uniform([2], s, 0, 1 << 30, dtype=tf.int64),
        seeds,
        fn_output_signature=tf.int64,
    )
    top = corner[:, 0] % (height - side + 1)
    left = corner[:, 1] % (width - side + 1)
    rows = tf.range(height, dtype=tf.int64)[None, :]
    cols = tf.range(width, dtype=tf.int64)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)  # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)  # [B, W]
    patch = in_rows[:, :, None, None] & in_cols[:, None, :, None]  # [B, H, W, 1]
    return tf.where(patch, tf.zeros_like(pixels), pixels)


# === Audio: float32 [B, samples] ===


def white_noise(waveforms: tf.Tensor, snr_db: float, seeds: tf.Tensor) -> tf.Tensor:
    """Adds white Gaussian noise at ``snr_db`` relative to each clip's own power.

    The drawn noise is rescaled to exactly the target power, so each clip's
    SNR is ``snr_db`` (silent clips stay silent). No clipping: the log-mel
    features take any amplitude.
    """
    samples = tf.shape(waveforms)[1:]
    noise = _per_example(seeds, lambda s: tf.random.stateless_normal(samples, s))
    noise /= tf.sqrt(tf.reduce_mean(noise**2, axis=1, keepdims=True))
    signal_power = tf.reduce_mean(waveforms**2, axis=1, keepdims=True)
    noise_power = signal_power / 10.0 ** (snr_db / 10.0)
    return waveforms + tf.sqrt(noise_power) * noise


def time_shift(waveforms: tf.Tensor, fraction: float, seeds: tf.Tensor) -> tf.Tensor:
    """Shifts each clip by ``fraction`` of its length, left or right at random, zero-filled."""
    samples = waveforms.shape[1]
    shift = int(round(fraction * samples))
    sign = tf.map_fn(
        lambda s: tf.random.stateless_uniform([], s, 0, 2, dtype=tf.int64),
        seeds,
        fn_output_signature=tf.int64,
    )
    offsets = shift * (2 * sign - 1)  # [B]: +shift moves the sound later
    source = tf.range(samples, dtype=tf.int64)[None, :] - offsets[:, None]  # [B, samples]
    inside = (source >= 0) & (source < samples)
    moved = tf.gather(waveforms, tf.clip_by_value(source, 0, samples - 1), batch_dims=1)
    return tf.where(inside, moved, tf.zeros_like(moved))


# === Text: raw UTF-8 strings ===


def _rng(seed: int, name: str, example_id: bytes) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(example_id)])


def typos(text: str, rate: float, rng: np.random.Generator) -> str:
    """Each character, with probability ``rate``, gets one typo: insert, delete, substitute or swap.

    One typo is one edit (a swap exchanges the character with the next one),
    so the Damerau-Levenshtein distance to the original is about
    ``rate * len(text)``.
    """
    out: list[str] = []
    chars = list(text)
    i = 0
    while i < len(chars):
        char = chars[i]
        if rng.random() >= rate:
            out.append(char)
        else:
            operation = TYPO_OPERATIONS[rng.integers(len(TYPO_OPERATIONS))]
            if operation == "insert":
                out += [char, TYPO_ALPHABET[rng.integers(len(TYPO_ALPHABET))]]
            elif operation == "substitute":
                others = [c for c in TYPO_ALPHABET if c != char]
                out.append(others[rng.integers(len(others))])
            elif operation == "swap" and i + 1 < len(chars) and chars[i + 1] != char:
                out += [chars[i + 1], char]
                i += 1
            elif operation == "swap":  # nothing to swap with: substitute instead
                out.append(TYPO_ALPHABET[(TYPO_ALPHABET.find(char) + 1) % len(TYPO_ALPHABET)])
            # delete: append nothing
        i += 1
    return "".join(out)


def word_dropout(text: str, rate: float, rng: np.random.Generator) -> str:
    """Drops each whitespace-separated word with probability ``rate``."""
    words = text.split()
    return " ".join(w for w in words if rng.random() >= rate)


def degrade_texts(texts: tf.Tensor, ids: tf.Tensor, degradation: Degradation, level: float, seed: int):
    """[B] UTF-8 strings -> [B] degraded strings (``typos`` or ``word_dropout``)."""
    function = {"typos": typos, "word_dropout": word_dropout}[degradation.kind]

    def apply(batch, batch_ids):
        out = [
            function(t.decode("utf-8"), level, _rng(seed, degradation.name, i)).encode("utf-8")
            for t, i in zip(batch, batch_ids, strict=True)
        ]
        return np.array(out, dtype=object)

    degraded = tf.numpy_function(apply, [texts, ids], tf.string, stateful=False)
    degraded.set_shape(texts.shape)
    return degraded


def missing_mask(ids: tf.Tensor, rate: float, seed: int, name: str) -> tf.Tensor:
    """[B] bool: which examples lose the modality (uniform draw < ``rate``).

    The draw depends on the example only, so the examples missing at a
    lower rate are also missing at every higher one; rate 1.0 drops all.
    """
    draws = _per_example(example_seeds(ids, seed, name), lambda s: tf.random.stateless_uniform([], s))
    return draws < rate
