"""Conversion-time audio reading: every common format and rate, two backends, bad files named."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from multimodal_tf.compat import tf
from multimodal_tf.config import AudioConfig, DataConfig
from multimodal_tf.data import audio_io, convert, validate
from multimodal_tf.data.audio import log_mel_spectrogram

RATES = (8000, 22050, 44100, 48000)
# (soundfile format, subtype, extension): 16/24-bit and float WAV, FLAC, Vorbis, MP3.
FORMATS = (
    ("WAV", "PCM_16", "wav"),
    ("WAV", "PCM_24", "wav"),
    ("WAV", "FLOAT", "wav"),
    ("FLAC", "PCM_16", "flac"),
    ("OGG", "VORBIS", "ogg"),
    ("MP3", "MPEG_LAYER_III", "mp3"),
)
LOSSLESS = ("PCM_16", "PCM_24", "FLOAT")
AUDIO = AudioConfig()
REPO = Path(__file__).resolve().parents[1]
needs_tfio = pytest.mark.skipif(
    not audio_io.tfio_available(),
    reason="tensorflow-io ops do not load here (the compatibility lock has them)",
)


def _clip(rate: int, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """A speech-like 1 s clip: a 200->2000 Hz chirp with a harmonic, some noise, faded ends."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    phase = 2 * np.pi * np.cumsum(200 + 1800 * t / seconds) / rate
    x = 0.3 * np.sin(phase) + 0.15 * np.sin(3 * phase) + 0.02 * rng.standard_normal(len(t))
    return (x * np.minimum(1, 10 * np.minimum(t, seconds - t) + 0.05)).astype(np.float32)


def _log_mel(wav_bytes: bytes) -> np.ndarray:
    values, rate = audio_io.parse_wav(wav_bytes)
    assert rate == AUDIO.sample_rate
    signal = np.zeros(AUDIO.sample_rate, np.float32)
    signal[: min(len(values), len(signal))] = values[: len(signal), 0]
    return log_mel_spectrogram(tf.constant(signal[None]), AUDIO).numpy()[0]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[tuple[int, str, str], Path]:
    folder = tmp_path_factory.mktemp("formats")
    out = {}
    for rate in RATES:
        for fmt, subtype, ext in FORMATS:
            path = folder / f"c{rate}_{subtype.lower()}.{ext}"
            soundfile.write(str(path), _clip(rate), rate, format=fmt, subtype=subtype)
            out[rate, subtype, ext] = path
    return out


def test_a_manifest_mixing_formats_and_rates_converts_with_soundfile(clips, tmp_path):
    rows = [[f"r{i}", "", "", str(path), i % 2, "train"] for i, path in enumerate(clips.values())]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "image", "text", "audio", "label", "split"], *rows])
    config = DataConfig(validation_fraction=0.0, num_shards=1, audio=AudioConfig(reader="soundfile"))
    assert not validate.validate(manifest, config).problems
    convert.convert(manifest, tmp_path / "out", config, progress=False)
    stored = {}
    for record in tf.data.TFRecordDataset([str(p) for p in (tmp_path / "out").glob("train-*")]):
        example = tf.train.Example.FromString(record.numpy()).features.feature
        stored[example["id"].bytes_list.value[0].decode()] = example["audio"].bytes_list.value[0]
    assert len(stored) == len(clips)
    for i, ((rate, subtype, _), _path) in enumerate(clips.items()):
        wav = stored[f"r{i}"]
        assert struct.unpack("<H", wav[34:36])[0] == 16 and struct.unpack("<I", wav[24:28])[0] == 16000
        # Independent reference: the float clip resampled by soxr directly.
        reference = audio_io.encode_wav16(
            audio_io.resample(_clip(rate)[:, None], rate, 16000, "soundfile"), 16000
        )
        if subtype in LOSSLESS:  # only 16-bit rounding apart (two LSBs: source and output)
            got, want = audio_io.parse_wav(wav)[0], audio_io.parse_wav(reference)[0]
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=2.5 / 32768)
        else:
            # Lossy codecs: compare what the model sees. Vorbis/MP3 at their
            # default quality keep the loud bins within ~0.2 nats (1.7 dB)
            # on average; MP3 adds the encoder's delay, kept by libsndfile.
            got, want = _log_mel(wav), _log_mel(reference)
            loud = want > np.log(0.05)
            assert np.abs(got - want)[loud].mean() < 0.35, (rate, subtype)


def _aligned_log_mel_difference(a: np.ndarray, b: np.ndarray, rate: int) -> tuple[int, float]:
    """(lag, mean |log-mel(b) - log-mel(a shifted by lag)|) over the mel bins a
    clip at ``rate`` can carry, away from the edges.

    tensorflow-io's resampler does not compensate its filter's delay: its
    output lags soxr's by a fixed number of output samples (32 at 16 kHz
    when downsampling, 64 when upsampling from 8 kHz; docs/benchmarks.md).
    Unaligned, that 2 ms shift alone costs ~0.1 nats, which would hide a real
    difference, so the clips are aligned first.
    """
    nyquist_bins = log_mel_spectrogram(tf.zeros([1, 16000]), AUDIO).shape[-1]
    top_hz = min(rate / 2, 8000) * 0.9
    mel_edges = np.linspace(
        2595 * np.log10(1 + AUDIO.lower_edge_hertz / 700),
        2595 * np.log10(1 + AUDIO.upper_edge_hertz / 700),
        nyquist_bins + 2,
    )
    usable = 700 * (10 ** (mel_edges[2:] / 2595) - 1) < top_hz
    middle = slice(4000, 12000)
    lag = max(range(-100, 101), key=lambda k: float(np.dot(np.roll(a, k)[middle], b[middle])))
    aligned = np.roll(a, lag)
    aligned[: max(lag, 0)] = 0
    got = log_mel_spectrogram(tf.constant(b[None, :16000]), AUDIO).numpy()[0]
    want = log_mel_spectrogram(tf.constant(aligned[None, :16000]), AUDIO).numpy()[0]
    frames = slice(5, -5)  # the edges see the shift's zero fill
    return lag, float(np.abs(got - want)[frames][:, usable].mean())


@needs_tfio
@pytest.mark.parametrize("rate", RATES)
def test_soundfile_and_tensorflow_io_backends_give_the_same_log_mel(clips, rate):
    # Aligned by tfio's lag, the two backends' log-mel features agree within
    # 0.005 nats (0.02 dB) mean over the bins both can carry (measured
    # 0.0002-0.0006).
    for subtype, ext in [(s, e) for _, s, e in FORMATS]:
        path = clips[rate, subtype, ext]
        a = audio_io.parse_wav(audio_io.to_wav16(path, 16000, "soundfile"))[0][:, 0]
        b = audio_io.parse_wav(audio_io.to_wav16(path, 16000, "tfio"))[0][:, 0]
        lag, diff = _aligned_log_mel_difference(a, b, rate)
        assert 0 <= lag <= 80, (rate, subtype, lag)
        assert diff < 0.005, (rate, subtype, lag, diff)


# What the compatibility stack's interpreter runs: convert each clip with its
# default reader (tensorflow-io, where its ops load) and save the 16 kHz clips.
_COMPAT_CONVERT = """
import json, sys
import numpy as np
from multimodal_tf.compat import tf
from multimodal_tf.data import audio_io
paths = json.loads(sys.argv[1])
clips = {str(i): audio_io.parse_wav(audio_io.to_wav16(p, 16000, "auto"))[0][:, 0] for i, p in enumerate(paths)}
np.savez(sys.argv[2], **clips)
print(json.dumps({"tf": tf.__version__, "backend": audio_io.resolve_backend("auto")}))
"""


def test_log_mel_matches_the_same_clips_converted_on_the_compatibility_stack(clips, tmp_path):
    """The default stack (TF 2.21, soundfile + soxr) against the compatibility
    lock (TF 2.17.1, tensorflow-io's reader and resampler) on every format and
    rate: the features the model sees agree within 0.005 nats (0.02 dB) mean,
    the same bound as the two backends in one process. ``.ci/run`` builds the
    compatibility venv (``make test-compat``) before this run."""
    if tf.__version__.startswith("2.17"):
        pytest.skip("this is the compatibility stack; the test runs on the default one against it")
    python = Path(os.environ.get("MMTF_COMPAT_PYTHON", REPO / ".venv-tf2.17" / "bin" / "python"))
    if not python.exists():
        pytest.skip(f"no compatibility-stack interpreter at {python} (make venv-compat builds it)")
    paths = [str(p) for p in clips.values()]
    out = tmp_path / "compat.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [str(python), "-c", _COMPAT_CONVERT, json.dumps(paths), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stack = json.loads(done.stdout.strip().splitlines()[-1])
    assert stack["tf"].startswith("2.17") and stack["backend"] == "tfio", stack
    converted = np.load(out)
    for i, (rate, subtype, _ext) in enumerate(clips):
        here = audio_io.parse_wav(audio_io.to_wav16(paths[i], 16000, "soundfile"))[0][:, 0]
        lag, diff = _aligned_log_mel_difference(here, converted[str(i)], rate)
        assert 0 <= lag <= 80, (rate, subtype, lag)
        assert diff < 0.005, (rate, subtype, lag, diff)


def _wav_header(channels=1, rate=16000, bits=16, data_size=None, data=b"\x00\x00" * 100) -> bytes:
    size = len(data) if data_size is None else data_size
    fmt = struct.pack(
        "<HHIIHH", 1, channels, rate, rate * max(channels, 1) * bits // 8, max(channels, 1) * bits // 8, bits
    )
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("backend", ["soundfile", pytest.param("tfio", marks=needs_tfio)])
def test_bad_audio_is_named_by_record_and_field_never_a_crash(clips, tmp_path, backend):
    bad = {}
    for _, subtype, ext in FORMATS[3:]:
        data = clips[22050, subtype, ext].read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
        bad[f"truncated_{ext}"] = f"cut.{ext}"
        (tmp_path / f"png.{ext}").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
        bad[f"not_{ext}"] = f"png.{ext}"
    (tmp_path / "zero_ch.wav").write_bytes(_wav_header(channels=0))
    (tmp_path / "huge.wav").write_bytes(_wav_header(data_size=0xFFFFFF00))
    (tmp_path / "slow.wav").write_bytes(_wav_header(rate=500))
    (tmp_path / "bits.wav").write_bytes(_wav_header(bits=12))
    bad |= {
        "zero_channels": "zero_ch.wav",
        "absurd_size": "huge.wav",
        "rate_500": "slow.wav",
        "bits_12": "bits.wav",
    }
    (tmp_path / "ok.flac").write_bytes(clips[44100, "PCM_16", "flac"].read_bytes())
    rows = [[rid, "", "", name, 0, "train"] for rid, name in bad.items()] + [
        ["good", "", "", "ok.flac", 1, "train"]
    ]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "image", "text", "audio", "label", "split"], *rows])
    report = validate.validate(manifest, DataConfig(audio=AudioConfig(reader=backend)))
    problems = {p.record_id: p for p in report.problems}
    assert set(problems) == set(bad), sorted(problems)
    assert all(p.field == "audio" for p in problems.values())
    assert "truncated" in problems["absurd_size"].reason
    assert "0 channels" in problems["zero_channels"].reason
    assert "below 1000 Hz" in problems["rate_500"].reason
    assert "12 bits" in problems["bits_12"].reason
    if backend == "soundfile":
        assert "truncated" in problems["truncated_mp3"].reason  # mp3 decodes up to the cut
        assert all("cannot decode" in problems[f"not_{e}"].reason for e in ("flac", "ogg", "mp3"))


def test_unloadable_tfio_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(audio_io, "tfio_available", lambda: False)
    assert audio_io.resolve_backend("auto") == "soundfile"
    with pytest.raises(ValueError, match="multimodal-tf\\[tfio\\]"):
        audio_io.resolve_backend("tfio")
    with pytest.raises(ValueError, match="audio backend must be one of"):
        audio_io.resolve_backend("ffmpeg")
