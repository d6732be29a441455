"""What a manifest holds, measured for choosing a config (``data.profile``).

:func:`profile_manifest` measures what a config depends on: which
modalities have data, image sizes and colour, text lengths (in the tokens
the tokenizer will emit), vocabulary growth and script, audio clip lengths,
the classes and their counts. ``autoconfig`` turns the profile into a config.

Media are sampled (``sample_size`` files per modality, a fixed seed), so a
profile of a large manifest costs seconds; texts are all read (they are in
the manifest already).
"""

from __future__ import annotations

import dataclasses
import random
import unicodedata
import wave
from pathlib import Path

import numpy as np

from multimodal_tf import config as config_lib
from multimodal_tf.data import manifest as manifest_lib

SAMPLE_SIZE = 300
MIN_PRESENCE = 0.01  # a modality present in fewer train rows than this is left out
# Scripts written without spaces between words: a "word" there is a whole
# phrase, so single characters (n-grams from 1) must carry the meaning.
UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


class ProfileError(ValueError):
    """The manifest cannot be profiled (no train rows, unreadable media); names the record."""


@dataclasses.dataclass
class DatasetProfile:
    """What :func:`infer_config` reads; every number is also written to the run directory."""

    manifest: str
    train_examples: int
    has_val: bool
    has_test: bool
    class_counts: dict[str, int]
    presence: dict[str, float]  # modality -> share of train rows that have it
    image: dict = dataclasses.field(default_factory=dict)
    text: dict = dataclasses.field(default_factory=dict)
    audio: dict = dataclasses.field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in config_lib.MODALITIES if self.presence.get(m, 0.0) >= MIN_PRESENCE)

    @property
    def imbalance(self) -> float:
        counts = [c for c in self.class_counts.values()]
        return max(counts) / max(1, min(counts)) if counts else 1.0


def words_of(text: str) -> list[str]:
    """Lower-cased runs of letters, digits and marks: the words of the ``ngrams`` tokenizer."""
    kept = "".join(c if unicodedata.category(c)[0] in "LNM" else " " for c in text.lower())
    return kept.split()


def ngram_token_count(text: str, ngram_range: tuple[int, int]) -> int:
    """Tokens the ``ngrams`` tokenizer emits for ``text``: each word (``<w>``) and its n-grams."""
    low, high = ngram_range
    words = words_of(text)
    return len(words) + sum(max(len(w) + 2 - n + 1, 0) for w in words for n in range(low, high + 1))


def unspaced_share(texts: list[str]) -> float:
    """Share of letters that belong to scripts written without spaces (CJK, Thai, ...)."""
    letters = [c for t in texts for c in t if unicodedata.category(c).startswith("L")]
    if not letters:
        return 0.0
    unspaced = sum(unicodedata.name(c, "").startswith(UNSPACED_SCRIPTS) for c in letters)
    return unspaced / len(letters)


def vocabulary_growth(texts: list[str]) -> float:
    """Share of the second half's word tokens never seen in the first half (Heaps' law, measured).

    High growth means a word-level vocabulary would miss many test words,
    so subword units (character n-grams) must carry them.
    """
    half = len(texts) // 2
    seen = {w for t in texts[:half] for w in words_of(t)}
    later = [w for t in texts[half:] for w in words_of(t)]
    return sum(w not in seen for w in later) / len(later) if later else 0.0


def _image_stats(paths: list[str]) -> dict:
    from PIL import Image  # noqa: PLC0415

    heights, widths, grey = [], [], 0
    for path in paths:
        try:
            with Image.open(path) as image:
                widths.append(image.width)
                heights.append(image.height)
                grey += _is_grey(image)
        except (OSError, ValueError) as e:
            raise ProfileError(f"image {path}: cannot be read ({e})") from None
    return {
        "sampled": len(paths),
        "median_height": float(np.median(heights)),
        "median_width": float(np.median(widths)),
        "grey_share": grey / len(paths),
    }


def _is_grey(image) -> bool:
    """True for a grey-scale mode, or colour pixels whose channels are (nearly) equal."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    pixels = np.asarray(image.convert("RGB").resize((16, 16)), np.int16)
    return bool(np.abs(pixels - pixels.mean(-1, keepdims=True)).max() <= 8)


def clip_seconds(path: str) -> float:
    """Duration of an audio file from its header (WAV by the standard library, else soundfile)."""
    try:
        if path.lower().endswith(".wav"):
            try:
                with wave.open(path) as clip:
                    return clip.getnframes() / clip.getframerate()
            except wave.Error:
                pass  # e.g. float WAV: soundfile reads it
        import soundfile  # noqa: PLC0415

        return float(soundfile.info(path).duration)
    except Exception as e:  # noqa: BLE001  (any reader error is the file's)
        raise ProfileError(f"audio {path}: cannot be read ({e})") from None


def _audio_stats(paths: list[str]) -> dict:
    seconds = [clip_seconds(p) for p in paths]
    return {
        "sampled": len(paths),
        "median_seconds": float(np.median(seconds)),
        "p90_seconds": float(np.percentile(seconds, 90)),
    }


def _text_stats(texts: list[str]) -> dict:
    unspaced = unspaced_share(texts)
    ngram_range = (1, 3) if unspaced > 0.3 else (2, 4)
    tokens = [ngram_token_count(t, ngram_range) for t in texts]
    grams = {w for t in texts for w in words_of(t)}
    for word in list(grams):
        padded = f"<{word}>"
        grams.update(
            padded[k : k + n]
            for n in range(ngram_range[0], ngram_range[1] + 1)
            for k in range(len(padded) - n + 1)
        )
    return {
        "texts": len(texts),
        "p95_words": float(np.percentile([len(words_of(t)) for t in texts], 95)),
        "p95_tokens": float(np.percentile(tokens, 95)),
        "unspaced_share": unspaced,
        "vocabulary_growth": vocabulary_growth(texts),
        "distinct_tokens": len(grams),
        "ngram_range": list(ngram_range),
    }


def profile_manifest(path: str | Path, sample_size: int = SAMPLE_SIZE, seed: int = 0) -> DatasetProfile:
    """Measures a manifest's train rows (media sampled, ``sample_size`` per modality).

    Raises:
        ManifestError: the file or its required columns are missing.
        ProfileError: no train rows, no labels, or a sampled media file that cannot be read.
    """
    data = config_lib.DataConfig()
    manifest = manifest_lib.read_manifest(path, data)
    for record in manifest.records:
        if record.split not in manifest_lib.SPLIT_ALIASES:
            raise ProfileError(
                f"{path}: row {record.row} id={record.id} split: {record.split!r} is not one of "
                f"{sorted(manifest_lib.SPLIT_ALIASES)}"
            )
    splits = {manifest_lib.SPLIT_ALIASES[r.split] for r in manifest.records}
    train = [r for r in manifest.records if manifest_lib.SPLIT_ALIASES[r.split] == manifest_lib.TRAIN]
    if not train:
        raise ProfileError(f"{path}: no rows with split 'train'")
    label_names = manifest_lib.label_names_of(manifest)
    counts = {name: 0 for name in label_names if not name.startswith("unused_")}
    for record in train:
        label = manifest_lib.label_id(record, label_names)
        if label is None:
            raise ProfileError(
                f"{path}: row {record.row} id={record.id} label: {record.label!r} is not a class"
            )
        counts[label_names[label]] += 1
    rng = random.Random(seed)

    def sample(values: list[str]) -> list[str]:
        return rng.sample(values, min(sample_size, len(values)))

    presence = {
        "image": sum(bool(r.image) for r in train) / len(train),
        "text": sum(bool(r.text) for r in train) / len(train),
        "audio": sum(bool(r.audio) for r in train) / len(train),
    }
    profile = DatasetProfile(
        str(path), len(train), manifest_lib.VAL in splits, manifest_lib.TEST in splits, counts, presence
    )
    if presence["image"] >= MIN_PRESENCE:
        profile.image = _image_stats(sample([r.image for r in train if r.image]))
    if presence["text"] >= MIN_PRESENCE:
        profile.text = _text_stats([r.text.decode("utf-8", "replace") for r in train if r.text])
    if presence["audio"] >= MIN_PRESENCE:
        profile.audio = _audio_stats(sample([r.audio for r in train if r.audio]))
    return profile
