"""Reading audio files of any common format on the host (conversion time).

WAV of any PCM width (8/16/24/32-bit integer, 32/64-bit float, mono or
multi-channel) is parsed here; FLAC/OGG/MP3 go through tensorflow-io. The
output is always rewritten as 16-bit PCM WAV, which ``tf.audio.decode_wav``
(the serving graph's decoder) reads.
"""

from __future__ import annotations

import io
import struct
import wave
from pathlib import Path

import numpy as np

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


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
    if channels < 1 or rate < 1:
        raise AudioError(f"bad header: {channels} channels at {rate} Hz")
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


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Any supported audio file -> (float32 [samples, channels], sample rate)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"file not found: {path}")
    if path.suffix.lower() == ".wav":
        return parse_wav(path.read_bytes())
    if path.suffix.lower() not in (".flac", ".ogg", ".mp3"):
        raise AudioError(f"unsupported audio extension {path.suffix!r}")
    import tensorflow_io as tfio  # lazily: conversion time only, never in serving graphs

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


def resample(values: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resamples [samples, channels] audio with tensorflow-io's band-limited resampler."""
    if rate == target:
        return values
    import tensorflow_io as tfio

    return tfio.audio.resample(values, rate_in=rate, rate_out=target).numpy()


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


def to_wav16(path: str | Path, target_rate: int) -> bytes:
    """Reads any supported file and returns 16-bit PCM WAV bytes at ``target_rate``.

    A file that already is 16-bit PCM WAV at that rate is returned unchanged.
    """
    path = Path(path)
    values, rate = read_audio(path)
    if values.shape[0] == 0:
        raise AudioError("no samples")
    if path.suffix.lower() == ".wav" and rate == target_rate:
        data = path.read_bytes()
        canonical = data[12:16] == b"fmt " and struct.unpack("<H", data[20:22])[0] == _PCM
        if canonical and struct.unpack("<H", data[34:36])[0] == 16:
            return data
    return encode_wav16(resample(values, rate, target_rate), target_rate)
