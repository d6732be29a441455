"""The modality names and each modality's preprocessing settings (``data.image``, ``data.text``, ``data.audio``).

Part of the experiment config (config.py re-exports them); a module of its own
so that other config modules can name the modalities without importing the
whole schema.
"""

from __future__ import annotations

import dataclasses

from multimodal_tf.typed_config import Checked, option

MODALITIES = ("image", "text", "audio")


@dataclasses.dataclass(frozen=True)
class ImageConfig(Checked):
    """Image preprocessing: decode, resize (keeping aspect) and scale to [0, 1]."""

    height: int = option(32, minimum=1)
    width: int = option(32, minimum=1)
    channels: int = option(3, choices=(1, 3))
    resize: str = option("pad", choices=("pad", "stretch"))  # "pad" keeps the aspect ratio
    # Largest height x width decoded, read from the file header before
    # decoding (in the serving graph too): a 76 KB PNG can declare
    # 20000 x 20000 pixels and cost gigabytes to decode. 0 = no limit.
    max_pixels: int = option(4096 * 4096, minimum=0)


@dataclasses.dataclass(frozen=True)
class TextConfig(Checked):
    """Text preprocessing: normalise, tokenize, pad/truncate."""

    max_tokens: int = option(16, minimum=1)
    # "wordpiece": ids from the WordPiece vocabulary built at conversion.
    # "ngrams": hashed words + character n-grams (fastText-style); generalises
    # to unseen words of short texts (names, labels) where WordPiece cannot.
    tokenizer: str = option("wordpiece", choices=("wordpiece", "ngrams"))
    vocab_size: int = 2000  # wordpiece: target size for the vocabulary built at conversion
    ngram_range: tuple[int, int] = (2, 4)  # ngrams: character n-gram lengths (inclusive)
    hash_buckets: int = 20000  # ngrams: ids are 1..hash_buckets (0 = padding)
    lower_case: bool = True
    # "auto": a cell that names an existing *.txt file is read from it;
    # "inline": the cell is the text; "path": the cell is always a file path.
    source: str = option("auto", choices=("auto", "inline", "path"))


@dataclasses.dataclass(frozen=True)
class AudioConfig(Checked):
    """Audio preprocessing: WAV -> mono -> fixed duration -> log-mel."""

    sample_rate: int = 16000
    duration_seconds: float = 1.0
    frame_length: int = 400  # 25 ms at 16 kHz
    frame_step: int = 160  # 10 ms at 16 kHz
    fft_length: int = 512
    num_mel_bins: int = 40
    lower_edge_hertz: float = 20.0
    upper_edge_hertz: float = 7600.0
    # Conversion-time decoder/resampler of FLAC/OGG/MP3 and non-matching rates
    # (data/audio_io.py): "soundfile" (libsndfile + soxr), "tfio"
    # (tensorflow-io, TF <= 2.17 only) or "auto" (tfio where its ops load).
    reader: str = option("auto", choices=("auto", "soundfile", "tfio"))
