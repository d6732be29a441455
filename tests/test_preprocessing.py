"""In-graph preprocessing checked against independent references."""

import dataclasses
import io
import math
import wave

import numpy as np
import pytest
from PIL import Image

from multimodal_tf.compat import tf
from multimodal_tf.config import AudioConfig, DataConfig, ImageConfig, TextConfig
from multimodal_tf.data import audio, image, text
from multimodal_tf.data.audio_io import encode_wav16
from multimodal_tf.data.preprocessing import Preprocessor


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _encoded(pixels, fmt):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_png_round_trips_to_the_same_pixels():
    pixels = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    out = image.decode_image(tf.constant(_png(pixels)), ImageConfig(height=12, width=12, channels=3))
    np.testing.assert_allclose(out.numpy(), pixels / 255.0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_every_format_and_channel_count_decodes_to_the_configured_shape(fmt, mode):
    if fmt == "JPEG" and mode == "RGBA":
        pytest.skip("JPEG has no alpha")
    pixels = np.full((10, 20, {"L": 1, "RGB": 3, "RGBA": 4}[mode]), 200, np.uint8)
    data = _encoded(pixels.squeeze(-1) if mode == "L" else pixels, fmt)
    out = image.decode_image(tf.constant(data), ImageConfig(height=8, width=8, channels=3)).numpy()
    assert out.shape == (8, 8, 3)
    # Aspect ratio kept: padded rows are zero, the content is ~200/255.
    assert out[0].max() == 0.0 and abs(out[4, 4, 0] - 200 / 255) < 0.05


def test_absent_and_corrupt_images():
    config = ImageConfig(height=4, width=4, channels=1)
    assert not image.decode_image(tf.constant(b""), config).numpy().any()
    with pytest.raises(tf.errors.InvalidArgumentError, match="image: not a PNG"):
        image.decode_image(tf.constant(b"definitely not an image"), config)


def _tone(frequency, rate=16000, seconds=1.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    wave_ = 0.5 * np.sin(2 * np.pi * frequency * t)
    return encode_wav16(np.stack([wave_] * channels, -1), rate)


def _hz_to_mel(f):
    return 2595.0 * math.log10(1.0 + f / 700.0)


def test_log_mel_of_a_tone_peaks_at_the_right_mel_bin():
    config = AudioConfig(num_mel_bins=40)
    spectrum = audio.preprocess_audio(tf.constant([_tone(1000.0)]), config).numpy()[0]
    peak = spectrum.mean(axis=0).argmax()
    # Independent reference: HTK mel bands equally spaced between the edges.
    low, high = _hz_to_mel(config.lower_edge_hertz), _hz_to_mel(config.upper_edge_hertz)
    centres = np.linspace(low, high, config.num_mel_bins + 2)[1:-1]
    expected = np.abs(centres - _hz_to_mel(1000.0)).argmin()
    assert abs(int(peak) - int(expected)) <= 1


def test_wav_is_made_mono_and_cropped_or_padded():
    config = AudioConfig(duration_seconds=0.5)
    stereo = audio.decode_wav(tf.constant(_tone(440.0, seconds=1.0, channels=2)), config).numpy()
    mono = audio.decode_wav(tf.constant(_tone(440.0, seconds=1.0, channels=1)), config).numpy()
    assert stereo.shape == (8000,)
    np.testing.assert_allclose(stereo, mono, atol=1e-4)
    short = audio.decode_wav(tf.constant(_tone(440.0, seconds=0.25)), config).numpy()
    assert short[4000:].max() == 0.0 and short[:4000].std() > 0.1
    assert not audio.decode_wav(tf.constant(b""), config).numpy().any()


def test_wav_errors_name_the_problem():
    config = AudioConfig()
    with pytest.raises(tf.errors.InvalidArgumentError, match="sample rate"):
        audio.decode_wav(tf.constant(_tone(440.0, rate=8000)), config)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a RIFF/WAVE"):
        audio.decode_wav(tf.constant(b"garbage bytes here"), config)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:  # 24-bit PCM: tf.audio.decode_wav reads 16-bit only
        w.setnchannels(1), w.setsampwidth(3), w.setframerate(16000), w.writeframes(b"\x00" * 300)
    with pytest.raises(tf.errors.InvalidArgumentError):
        audio.decode_wav(tf.constant(buffer.getvalue()), config)


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "green", "thing", "a", "is", "##s", "it"]


def test_tokenizer_ids_round_trip_to_text():
    tokenizer = text.TextTokenizer(VOCAB, TextConfig(max_tokens=6))
    ids = tokenizer(tf.constant(["A red thing", "It is Green things", "", "purple"])).numpy()
    assert ids.shape == (4, 6) and ids.dtype == np.int64
    assert tokenizer.detokenize(ids) == ["a red thing", "it is green things", "", "[UNK]"]
    assert not ids[2].any()  # absent text -> all padding


def test_tokenizer_truncates_and_rejects_invalid_utf8():
    tokenizer = text.TextTokenizer(VOCAB, TextConfig(max_tokens=2))
    assert tokenizer(tf.constant(["a red thing"])).numpy().tolist() == [[8, 5]]
    with pytest.raises(tf.errors.InvalidArgumentError, match="text: not valid UTF-8"):
        tokenizer(tf.constant([b"caf\xe9"]))


def _reference_ngrams(text_value: str, low: int, high: int) -> list[str]:
    """Independent n-gram extraction: words (letters/digits) first, then each word's n-grams."""
    import re

    words = ["<" + w + ">" for w in re.findall(r"[^\W_]+", text_value.lower())]
    grams = [w[i : i + n] for w in words for n in range(low, high + 1) for i in range(len(w) - n + 1)]
    return words + grams


def test_ngram_tokenizer_matches_a_python_reference():
    config = TextConfig(tokenizer="ngrams", max_tokens=64, ngram_range=(2, 3), hash_buckets=1000)
    tokenizer = text.TextTokenizer(text.RESERVED_TOKENS, config)
    texts = ["Grinning face", "flag: Côte d’Ivoire", "", "a"]
    ids = tokenizer(tf.constant(texts)).numpy()
    assert ids.shape == (4, 64) and ids.dtype == np.int64
    assert text.vocabulary_size(config, text.RESERVED_TOKENS) == 1001
    for row, value in zip(ids, texts, strict=True):
        grams = _reference_ngrams(value, 2, 3)
        expected = (tf.strings.to_hash_bucket_fast(grams, 1000).numpy() + 1).tolist() if grams else []
        assert row[: len(expected)].tolist() == expected, value
        assert not row[len(expected) :].any()
    assert ids.max() <= 1000


def test_ngram_tokenizer_shares_ids_between_related_unseen_words_and_truncates_ngrams_first():
    config = TextConfig(tokenizer="ngrams", max_tokens=3, ngram_range=(3, 3), hash_buckets=1 << 20)
    tokenizer = text.TextTokenizer(text.RESERVED_TOKENS, config)
    wide = text.TextTokenizer(text.RESERVED_TOKENS, dataclasses.replace(config, max_tokens=32))
    smiling, smiley = (set(row) for row in wide(tf.constant(["smiling", "smiley"])).numpy())
    assert len((smiling & smiley) - {0}) >= 3  # "<sm", "smi", "mil"
    # Three words, max_tokens 3: the three word ids survive, no n-gram does.
    words_only = tokenizer(tf.constant(["cat dog fox"])).numpy()[0]
    expected = tf.strings.to_hash_bucket_fast(["<cat>", "<dog>", "<fox>"], 1 << 20).numpy() + 1
    assert words_only.tolist() == expected.tolist()
    with pytest.raises(tf.errors.InvalidArgumentError, match="text: not valid UTF-8"):
        tokenizer(tf.constant([b"caf\xe9"]))
    with pytest.raises(ValueError, match="tokenizer: expected one of"):  # checked when the config is built
        text.TextTokenizer(text.RESERVED_TOKENS, TextConfig(tokenizer="bpe"))
    with pytest.raises(ValueError, match="data.text.ngram_range"):
        text.TextTokenizer(text.RESERVED_TOKENS, TextConfig(tokenizer="ngrams", ngram_range=(3, 2)))
    with pytest.raises(ValueError, match="cannot be detokenized"):
        tokenizer.detokenize([[1, 2]])


def test_build_vocabulary_learns_words_of_the_corpus():
    vocab = text.build_vocabulary(["red thing"] * 5 + ["green thing"] * 5, TextConfig(vocab_size=100))
    assert vocab[:5] == list(text.RESERVED_TOKENS)
    assert {"red", "green", "thing"} <= set(vocab)


def test_preprocessor_outputs_match_the_feature_specs_and_flags_absence():
    from multimodal_tf.data.features import model_feature_specs

    config = DataConfig(
        image=ImageConfig(height=8, width=8),
        text=TextConfig(max_tokens=4),
        audio=AudioConfig(duration_seconds=0.25),
    )
    preprocessor = Preprocessor(config, VOCAB)
    pixels = np.zeros((5, 5, 3), np.uint8)
    raw = {
        "image": tf.constant([_png(pixels), b""]),
        "text": tf.constant(["", "red"]),
        "audio": tf.constant([b"", _tone(300.0, seconds=0.25)]),
    }
    out = preprocessor(raw)
    specs = model_feature_specs(config)
    assert set(out) == set(specs)
    for name, spec in specs.items():
        assert spec.is_compatible_with(out[name]), name
    assert out["image_present"].numpy().tolist() == [1.0, 0.0]
    assert out["text_present"].numpy().tolist() == [0.0, 1.0]
    assert not out["audio"].numpy()[0].any() and out["audio"].numpy()[1].any()
