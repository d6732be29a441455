"""Reading audio files of any common format on the host (conversion time).

WAV of any PCM width (8/16/24/32-bit integer, 32/64-bit float, mono or
multi-channel) is parsed here. FLAC, OGG/Vorbis and MP3 are decoded and
clips resampled by one of two backends:

- ``soundfile``: libsndfile (shipped inside the soundfile wheel) decodes,
  soxr resamples. Needs no TensorFlow ops, so it works on every TF version.
- ``tfio``: tensorflow-io's ``AudioIOTensor`` and ``resample`` (the optional
  ``multimodal-tf[tfio]`` extra). Its native ops only load on TF <= 2.17.

``auto`` picks ``tfio`` where its ops load, else ``soundfile``
(:func:`resolve_backend`). The output is always rewritten as 16-bit PCM WAV,
which ``tf.audio.decode_wav`` (the serving graph's decoder, core TF) reads.
"""

from __future__ import annotations

import functools
import io
import struct
import wave
from pathlib import Path

import numpy as np

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
BACKENDS = ("auto", "soundfile", "tfio")
COMPRESSED = (".flac", ".ogg", ".mp3")
# Below this a "sample rate" is a broken header, not speech or music (the
# lowest rate telephony uses is 8 kHz).
MIN_SAMPLE_RATE = 1000
# A header that declares more than this many channels is corrupt (WAV's own
# channel mask covers 18 speaker positions).
MAX_CHANNELS = 64


class AudioError(ValueError):
    """The audio cannot be read; the message says why."""


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """WAV bytes -> (float32 [samples, channels] in [-1, 1], sample rate)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError("not a RIFF/WAVE file")
    position, fmt, samples = 12, None, None
    while position + 8 <= len(data):
        chunk_id, size = struct.unpack("<4sI", data[position : position + 8])
        body = data[position + 8 : position + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise AudioError("truncated fmt chunk")
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == _EXTENSIBLE and len(body) >= 26:
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif chunk_id == b"data":
            samples = body
            if len(body) < size:
                raise AudioError(f"truncated: data chunk declares {size} bytes, has {len(body)}")
            break
        position += 8 + size + (size & 1)
    if fmt is None:
        raise AudioError("no fmt chunk")
    if samples is None:
        raise AudioError("no data chunk")
    tag, channels, rate, _, _, bits = fmt
    if not 1 <= channels <= MAX_CHANNELS or rate < 1:
        raise AudioError(f"bad header: {channels} channels at {rate} Hz")
    if bits not in (8, 16, 24, 32, 64):
        raise AudioError(f"unsupported WAV encoding (format tag {tag}, {bits} bits)")
    width = bits // 8
    usable = len(samples) - len(samples) % (width * channels)
    raw = samples[:usable]
    if tag == _FLOAT and bits in (32, 64):
        values = np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    elif tag == _PCM and bits == 8:
        values = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == _PCM and bits == 16:
        values = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif tag == _PCM and bits == 24:
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = bytes3[:, 0] | (bytes3[:, 1] << 8) | (bytes3[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        values = ints.astype(np.float32) / float(1 << 23)
    elif tag == _PCM and bits == 32:
        values = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise AudioError(f"unsupported WAV encoding (format tag {tag}, {bits} bits)")
    return values.reshape(-1, channels), rate


@functools.cache
def tfio_available() -> bool:
    """Whether tensorflow-io is installed and its native audio ops load here."""
    try:
        import tensorflow_io as tfio  # noqa: PLC0415  (optional extra)

        tfio.audio.resample(np.zeros([8, 1], np.float32), rate_in=2, rate_out=1)
    except Exception:  # ImportError, or NotImplementedError/NotFoundError from the .so on TF >= 2.18
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> ``tfio`` where its ops load, else ``soundfile``; others are checked."""
    if backend not in BACKENDS:
        raise ValueError(f"audio backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "tfio" if tfio_available() else "soundfile"
    if backend == "tfio" and not tfio_available():
        raise ValueError(
            "audio backend 'tfio' needs tensorflow-io with loadable ops "
            "(pip install 'multimodal-tf[tfio]', TF <= 2.17); use 'soundfile'"
        )
    return backend


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile  # noqa: PLC0415  (conversion time only)

    try:
        info = soundfile.info(str(path))
        values, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"cannot decode {path.name}: {e}") from None
    # A cut-off MP3 decodes without error up to the cut; its header still
    # declares the full length.
    if info.frames > 0 and values.shape[0] < info.frames * 0.99:
        raise AudioError(f"truncated: {path.name} declares {info.frames} samples, holds {values.shape[0]}")
    return values, int(rate)


def _read_tfio(path: Path) -> tuple[np.ndarray, int]:
    import tensorflow_io as tfio  # noqa: PLC0415  (optional extra, conversion time only)

    try:
        tensor = tfio.audio.AudioIOTensor(str(path))
        values = tensor.to_tensor().numpy()
        rate = int(tensor.rate.numpy())
    except Exception as e:  # tensorflow-io raises a variety of types
        raise AudioError(f"cannot decode {path.name}: {e}") from None
    if values.dtype != np.float32:
        info = np.iinfo(values.dtype)
        values = values.astype(np.float32) / float(max(abs(info.min), info.max))
    return values, rate


def read_audio(path: str | Path, backend: str = "auto") -> tuple[np.ndarray, int]:
    """Any supported audio file -> (float32 [samples, channels], sample rate).

    Args:
        path: a .wav, .flac, .ogg or .mp3 file.
        backend: decoder for compressed formats (see :func:`resolve_backend`).

    Raises:
        AudioError: the file is missing, not what its extension says,
            truncated, empty or has an implausible header (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".wav":
        values, rate = parse_wav(path.read_bytes())
    elif suffix in COMPRESSED:
        reader = _read_tfio if resolve_backend(backend) == "tfio" else _read_soundfile
        values, rate = reader(path)
    else:
        raise AudioError(f"unsupported audio extension {path.suffix!r}")
    if rate < MIN_SAMPLE_RATE:
        raise AudioError(f"sample rate {rate} Hz is below {MIN_SAMPLE_RATE} Hz")
    if values.ndim != 2 or not 1 <= values.shape[1] <= MAX_CHANNELS:
        raise AudioError(f"bad channel count {values.shape[1] if values.ndim == 2 else values.shape}")
    if values.shape[0] == 0:
        raise AudioError("no samples")
    if not np.isfinite(values).all():
        raise AudioError("samples are NaN or infinite")
    return values, rate


def resample(values: np.ndarray, rate: int, target: int, backend: str = "auto") -> np.ndarray:
    """Resamples [samples, channels] audio with a band-limited resampler.

    ``soundfile`` uses soxr at its "HQ" quality (20-bit, linear phase);
    ``tfio`` tensorflow-io's resampler. docs/benchmarks.md compares the two.
    """
    if rate == target:
        return values
    if resolve_backend(backend) == "tfio":
        import tensorflow_io as tfio  # noqa: PLC0415

        return tfio.audio.resample(values, rate_in=rate, rate_out=target).numpy()
    import soxr  # noqa: PLC0415

    return soxr.resample(np.ascontiguousarray(values, np.float32), rate, target, quality="HQ").astype(
        np.float32
    )


def encode_wav16(values: np.ndarray, rate: int) -> bytes:
    """float [samples, channels] -> 16-bit PCM WAV bytes."""
    values = np.asarray(values, np.float32)
    if values.ndim == 1:
        values = values[:, None]
    ints = np.clip(np.round(values * 32767.0), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(values.shape[1])
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(ints.tobytes())
    return buffer.getvalue()


def to_wav16(path: str | Path, target_rate: int, backend: str = "auto") -> bytes:
    """Reads any supported file and returns 16-bit PCM WAV bytes at ``target_rate``.

    A file that already is 16-bit PCM WAV at that rate is returned unchanged.
    """
    path = Path(path)
    values, rate = read_audio(path, backend)
    if path.suffix.lower() == ".wav" and rate == target_rate:
        data = path.read_bytes()
        canonical = data[12:16] == b"fmt " and struct.unpack("<H", data[20:22])[0] == _PCM
        if canonical and struct.unpack("<H", data[34:36])[0] == 16:
            return data
    return encode_wav16(resample(values, rate, target_rate, backend), target_rate)
