"""Conversion-time resamplers side by side: soxr (soundfile backend) vs tensorflow-io.

Quality, measured against signals known analytically at the output rate:
- SNR of an in-band chirp (100 Hz -> 3.5 kHz, aperiodic, so its delay is
  unambiguous) after resampling to 16 kHz, each output first aligned by the
  resampler's own whole-sample delay (reported);
- alias rejection: a 9 kHz tone (above the 8 kHz output Nyquist) must
  vanish; the residual's level relative to the input tone is reported.
Speed: seconds to resample one minute of 44.1 kHz mono audio (median of 3).

tensorflow-io's ops load on TF <= 2.17 only: on other stacks its rows say so.
Run: python benchmarks/resample.py
"""

from __future__ import annotations

import time

import numpy as np

from multimodal_tf.data import audio_io

TARGET = 16000


def _tones(rate: int, freqs, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return sum(0.3 * np.sin(2 * np.pi * f * t) for f in freqs).astype(np.float32)


def _chirp(rate: int, seconds: float = 2.0, start: float = 100.0, stop: float = 3500.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * (start * t + (stop - start) * t**2 / (2 * seconds)))).astype(np.float32)


def _delay(out: np.ndarray, ref: np.ndarray) -> int:
    middle = slice(len(ref) // 4, 3 * len(ref) // 4)
    return max(range(-100, 101), key=lambda k: float(np.dot(np.roll(out, -k)[middle], ref[middle])))


def quality(backend: str, rate: int) -> tuple[int, float, float]:
    """(delay in output samples, in-band SNR dB, alias level dB) of one backend at one input rate."""
    signal = _chirp(rate)
    out = audio_io.resample(signal[:, None], rate, TARGET, backend)[:, 0]
    ref = _chirp(TARGET)[: len(out)]
    delay = _delay(out, ref)
    middle = slice(len(ref) // 4, 3 * len(ref) // 4)
    error = np.roll(out, -delay)[middle] - ref[middle]
    snr = 10 * np.log10(np.sum(ref[middle] ** 2) / max(np.sum(error**2), 1e-30))
    alias_in = _tones(rate, (9000,)) if rate > 18000 else None
    alias = float("nan")
    if alias_in is not None:
        alias_out = audio_io.resample(alias_in[:, None], rate, TARGET, backend)[:, 0]
        alias = 10 * np.log10(np.mean(alias_out[middle] ** 2) / np.mean(alias_in**2) + 1e-30)
    return delay, snr, alias


def speed(backend: str) -> float:
    audio = np.random.default_rng(0).standard_normal((44100 * 60, 1)).astype(np.float32)
    audio_io.resample(audio[:44100], 44100, TARGET, backend)  # warm-up (tfio traces a graph)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        audio_io.resample(audio, 44100, TARGET, backend)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    backends = ["soundfile"] + (["tfio"] if audio_io.tfio_available() else [])
    print("| resampler | input rate | delay (samples @16k) | in-band SNR dB | 9 kHz alias dB |")
    print("|---|---|---|---|---|")
    for backend in backends:
        for rate in (8000, 22050, 44100, 48000):
            delay, snr, alias = quality(backend, rate)
            print(f"| {backend} | {rate} | {delay} | {snr:.1f} | {alias:.1f} |")
    seconds = {backend: speed(backend) for backend in backends}
    for backend, value in seconds.items():
        print(f"{backend}: {value:.3f} s per minute of 44.1 kHz audio")
    if "tfio" in seconds:
        print(f"soxr is {seconds['tfio'] / seconds['soundfile']:.1f}x faster than tensorflow-io")
    else:
        print("tensorflow-io: ops do not load on this TF (compare on the compatibility lock)")


if __name__ == "__main__":
    main()
