"""In-graph audio preprocessing: WAV bytes -> log-mel spectrogram.

Core TF ops only (``tf.audio.decode_wav`` + ``tf.signal``): tensorflow-io is
not linked into TF Serving, so it is used at conversion time only.
``tf.audio.decode_wav`` reads 16-bit PCM; conversion rewrites other formats.
"""

from __future__ import annotations

import tensorflow as tf

from multimodal_tf.config import AudioConfig

LOG_OFFSET = 1e-6  # keeps log() finite on silent frames


def num_samples(config: AudioConfig) -> int:
    return int(round(config.sample_rate * config.duration_seconds))


def decode_wav(encoded: tf.Tensor, config: AudioConfig) -> tf.Tensor:
    """One WAV (scalar string) -> float32 [num_samples] mono waveform in [-1, 1].

    Crops or zero-pads to the configured duration; an empty string yields
    zeros. A wrong sample rate is an error naming both rates.
    """
    length = num_samples(config)

    def decode():
        header_ok = tf.logical_and(
            tf.strings.substr(encoded, 0, 4) == b"RIFF",
            tf.strings.substr(encoded, 8, 4) == b"WAVE",
        )
        check_header = tf.debugging.Assert(header_ok, ["audio: not a RIFF/WAVE file"])
        with tf.control_dependencies([check_header]):
            waveform, rate = tf.audio.decode_wav(encoded, desired_channels=-1)
        check_rate = tf.debugging.Assert(
            tf.equal(rate, config.sample_rate),
            ["audio: sample rate", rate, "Hz, expected", config.sample_rate, "Hz"],
        )
        check_samples = tf.debugging.Assert(tf.shape(waveform)[0] > 0, ["audio: WAV holds no samples"])
        with tf.control_dependencies([check_rate, check_samples]):
            mono = tf.reduce_mean(waveform, axis=-1)
        mono = mono[:length]
        return tf.pad(mono, [[0, length - tf.shape(mono)[0]]])

    def absent():
        return tf.zeros([length], tf.float32)

    signal = tf.cond(tf.strings.length(encoded) > 0, decode, absent)
    signal.set_shape([length])
    return signal


def log_mel_spectrogram(signals: tf.Tensor, config: AudioConfig) -> tf.Tensor:
    """[B, samples] waveforms -> [B, frames, mel_bins] log-mel magnitudes."""
    stft = tf.signal.stft(
        signals,
        frame_length=config.frame_length,
        frame_step=config.frame_step,
        fft_length=config.fft_length,
    )
    magnitude = tf.abs(stft)
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(
        num_mel_bins=config.num_mel_bins,
        num_spectrogram_bins=config.fft_length // 2 + 1,
        sample_rate=config.sample_rate,
        lower_edge_hertz=config.lower_edge_hertz,
        upper_edge_hertz=config.upper_edge_hertz,
    )
    mel = tf.tensordot(magnitude, mel_matrix, 1)
    return tf.math.log(mel + LOG_OFFSET)


def preprocess_waveforms(encoded: tf.Tensor, config: AudioConfig) -> tf.Tensor:
    """[B] WAV strings -> [B, samples] mono waveforms at the configured rate (zeros where absent)."""
    spec = tf.TensorSpec([num_samples(config)], tf.float32)
    return tf.map_fn(lambda x: decode_wav(x, config), encoded, fn_output_signature=spec)


def preprocess_audio(encoded: tf.Tensor, config: AudioConfig) -> tf.Tensor:
    """[B] WAV strings -> [B, frames, mel_bins] log-mel (zeros where absent)."""
    signals = preprocess_waveforms(encoded, config)
    present = tf.cast(tf.strings.length(encoded) > 0, tf.float32)
    return log_mel_spectrogram(signals, config) * present[:, None, None]
