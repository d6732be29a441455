"""Robustness report: each degradation measured on real decoded data, then the CLI end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from multimodal_tf import cli
from multimodal_tf import degradations as deg
from multimodal_tf.compat import tf
from multimodal_tf.data import features
from multimodal_tf.data.audio import preprocess_waveforms
from multimodal_tf.data.cache import default_tfrecord_dir
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.evaluation import predict_split
from multimodal_tf.robustness import (
    DegradingPreprocessor,
    curves,
    effective_robustness,
    relative_robustness,
    select,
)
from multimodal_tf.run_dir import load_run, load_trained_model
from multimodal_tf.testing import tiny_config
from multimodal_tf.training import train

SEED = 3


@pytest.fixture(scope="module")
def trained_run(synth_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust_run")
    config = tiny_config(f"data.manifest={synth_manifest}", f"train.output_dir={out}", "train.epochs=2")
    return train(config, progress=False)


@pytest.fixture(scope="module")
def records(trained_run):
    """(preprocessor, raw parsed records of every split) of the trained run's dataset."""
    config, metadata = load_run(trained_run)
    directory = Path(default_tfrecord_dir(config.data))
    files = [str(directory / f) for split in sorted(metadata.shards) for f in metadata.shards[split]]
    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model)
    serialized = next(iter(tf.data.TFRecordDataset(files).batch(100_000)))
    return preprocessor, preprocessor.parse_examples(serialized)


def _subset(records, count=64):
    """The first ``count`` records and their clean features (graph mode: eager map_fn is slow)."""
    preprocessor, raw = records
    raw = {k: v[:count] for k, v in raw.items()}
    return preprocessor, raw, tf.function(preprocessor.__call__)(raw)


def _seeds(raw, name):
    return deg.example_seeds(raw[features.ID], SEED, name)


def _present(raw, modality):
    return (tf.strings.length(raw[modality]) > 0).numpy()


def test_white_noise_has_the_requested_snr_on_every_clip(records):
    preprocessor, raw, _ = _subset(records)
    clean = tf.function(preprocess_waveforms)(raw[features.AUDIO], preprocessor.config.audio)
    present = _present(raw, features.AUDIO)
    for snr in deg.get("audio/white_noise").levels[1:]:
        noisy = deg.white_noise(clean, snr, _seeds(raw, "audio/white_noise")).numpy()
        signal = np.mean(clean.numpy()[present] ** 2, axis=1)
        noise = np.mean((noisy - clean.numpy())[present] ** 2, axis=1)
        measured = 10 * np.log10(signal / noise)
        assert np.all(np.abs(measured - snr) < 0.5), (snr, measured.min(), measured.max())


def test_time_shift_moves_each_clip_by_the_fraction_zero_filled(records):
    preprocessor, raw, _ = _subset(records)
    clean = tf.function(preprocess_waveforms)(raw[features.AUDIO], preprocessor.config.audio).numpy()
    shifted = deg.time_shift(tf.constant(clean), 0.25, _seeds(raw, "audio/time_shift")).numpy()
    shift = round(0.25 * clean.shape[1])
    directions = set()
    for c, s in zip(clean, shifted, strict=True):
        if np.array_equal(s, np.concatenate([np.zeros(shift), c[:-shift]])):
            directions.add("later")
        elif np.array_equal(s, np.concatenate([c[shift:], np.zeros(shift)])):
            directions.add("earlier")
        else:
            pytest.fail("a clip is not its original shifted by 25 % of its length")
    assert directions == {"later", "earlier"}


def _osa_distance(a: str, b: str) -> int:
    """Optimal-string-alignment (Damerau-Levenshtein) distance."""
    d = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
    d[:, 0], d[0, :] = np.arange(len(a) + 1), np.arange(len(b) + 1)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i, j] = min(d[i, j], d[i - 2, j - 2] + 1)
    return int(d[-1, -1])


def _texts(raw, name, level):
    ids, texts = raw[features.ID], raw[features.TEXT]
    degraded = deg.degrade_texts(texts, ids, deg.get(name), level, SEED).numpy()
    return [t.decode() for t in texts.numpy()], [t.decode() for t in degraded]


def test_typo_rate_measured_as_edit_distance_per_character(records):
    _, raw = records
    for rate in deg.get("text/typos").levels[1:]:
        clean, typed = _texts(raw, "text/typos", rate)
        measured = sum(map(_osa_distance, clean, typed)) / sum(map(len, clean))
        assert abs(measured - rate) < 0.2 * rate, (rate, measured)
    assert _texts(raw, "text/typos", 0.1) == _texts(raw, "text/typos", 0.1)  # deterministic


def test_word_dropout_rate_measured(records):
    _, raw = records
    for rate in deg.get("text/word_dropout").levels[1:]:
        clean, dropped = _texts(raw, "text/word_dropout", rate)
        kept = sum(len(t.split()) for t in dropped) / sum(len(t.split()) for t in clean)
        assert abs((1 - kept) - rate) < 0.05, (rate, 1 - kept)
        assert all(set(d.split()) <= set(c.split()) for c, d in zip(clean, dropped, strict=True))


def _pixels(records):
    _, raw, clean = _subset(records)
    return clean[features.IMAGE], raw


def test_image_noise_sigma_measured_on_unclipped_pixels(records):
    pixels, raw = _pixels(records)
    seeds = _seeds(raw, "image/gaussian_noise")
    # The synthetic images are mostly saturated: squeeze them into [0.45, 0.55]
    # so that noise up to sigma = 0.1 is (practically) never clipped.
    squeezed = 0.45 + 0.1 * pixels
    for sigma in (0.05, 0.1):
        difference = (deg.gaussian_noise(squeezed, sigma, seeds) - squeezed).numpy()
        assert abs(difference.std() / sigma - 1) < 0.02 and abs(difference.mean()) < 0.02 * sigma
    noisy = deg.gaussian_noise(pixels, 0.3, seeds).numpy()
    assert noisy.min() >= 0 and noisy.max() <= 1 and np.abs(noisy - pixels.numpy()).mean() > 0.05


def test_blur_equals_scipy_gaussian_filter(records):
    pixels, _ = _pixels(records)
    for sigma in deg.get("image/gaussian_blur").levels[1:]:
        blurred = deg.gaussian_blur(pixels, sigma).numpy()
        expected = ndimage.gaussian_filter(pixels.numpy(), sigma=(0, sigma, sigma, 0), mode="reflect")
        np.testing.assert_allclose(blurred, expected, atol=1e-5)


def test_occlusion_blacks_out_one_square_of_the_requested_area(records):
    pixels, raw = _pixels(records)
    height, width = pixels.shape[1:3]
    for fraction in deg.get("image/occlusion").levels[1:]:
        seeds = _seeds(raw, "image/occlusion")
        covered = 1 - deg.occlusion(tf.ones_like(pixels), fraction, seeds).numpy()[..., 0]  # [B, H, W]
        assert np.all(np.abs(covered.mean(axis=(1, 2)) - fraction) < 0.03), fraction
        rows, cols = covered.any(axis=2), covered.any(axis=1)
        side = deg.occlusion_side(fraction, height, width)
        assert np.all(rows.sum(1) == side) and np.all(cols.sum(1) == side)  # one side x side square
        occluded = deg.occlusion(pixels, fraction, seeds).numpy()
        assert np.all(occluded[covered > 0] == 0) and np.all(
            occluded[covered == 0] == pixels.numpy()[covered == 0]
        )


def test_missing_draws_the_rate_and_nests_subsets(records):
    _, raw = records
    ids = raw[features.ID]
    masks = {r: deg.missing_mask(ids, r, SEED, "image/missing").numpy() for r in (0.25, 0.5, 1.0)}
    assert abs(masks[0.25].mean() - 0.25) < 0.06 and abs(masks[0.5].mean() - 0.5) < 0.06
    assert masks[1.0].all() and np.all(masks[0.5][masks[0.25]])


def test_degrading_preprocessor_changes_only_the_degraded_modality(records):
    preprocessor, raw, clean = _subset(records, 32)
    clean = {k: v.numpy() for k, v in clean.items()}
    for degradation in select((), preprocessor.modalities):
        presence = features.presence_name(degradation.modality)
        affected = (
            {degradation.modality, presence} if degradation.kind == "missing" else {degradation.modality}
        )
        level = degradation.levels[-1]
        degraded = tf.function(DegradingPreprocessor(preprocessor, degradation, level, SEED).__call__)(raw)
        for name, value in degraded.items():
            changed = not np.array_equal(value.numpy(), clean[name])
            assert changed == (name in affected), (degradation.name, name)
        expected = 0 if degradation.kind == "missing" else clean[presence]
        assert np.array_equal(degraded[presence].numpy(), np.zeros_like(clean[presence]) + expected)


def test_robustness_figures_follow_the_documented_formulas():
    assert relative_robustness([0.9, 0.9, 0.9]) == pytest.approx(0.9)
    assert relative_robustness([1.0, 0.5, 0.0]) == pytest.approx(0.5)  # (0.75 + 0.25) / 2
    assert effective_robustness([0.9, 0.8, 0.6]) == pytest.approx(-0.2)  # flat trend
    # Baseline falls 0.2 per level from 0.7: trend 0.9, 0.7, 0.5 -> gaps +0.1, +0.1.
    assert effective_robustness([0.9, 0.8, 0.6], [0.7, 0.5, 0.3]) == pytest.approx(0.1)


def test_unknown_or_unused_degradation_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown degradation 'image/rain'.*image/occlusion"):
        select(("image/rain",), ("image", "text"))
    with pytest.raises(ValueError, match="'audio/white_noise' degrades audio.*does not use"):
        select(("audio/white_noise",), ("image", "text"))


def test_missing_at_rate_one_is_the_ablation_and_level_zero_the_clean_accuracy(trained_run):
    config, metadata, model = load_trained_model(trained_run)
    chosen = select(("text/missing",), config.model.modalities)
    clean, accuracies = curves(model, config, metadata, "test", chosen, SEED)
    probabilities, labels, _ = predict_split(model, config, metadata, "test")
    assert clean == accuracies["text/missing"][0] == (probabilities.argmax(-1) == labels).mean()
    # What modality_ablation reports as "without text".
    probabilities, labels, _ = predict_split(model, config, metadata, "test", drop=("text",))
    assert accuracies["text/missing"][-1] == (probabilities.argmax(-1) == labels).mean()


# slow: the CLI over the library path the tests above check (~20 s); keeps the default run under 15 min
@pytest.mark.slow
def test_cli_robustness_report_with_one_degradation(trained_run, capsys):
    argv = ["evaluate", str(trained_run), "--no-ablation", "--degradations", "audio/white_noise"]
    assert cli.main(argv) == 0
    report = json.loads((trained_run / "report.json").read_text())
    [row] = report["robustness"]["degradations"]
    assert row["name"] == "audio/white_noise" and row["labels"] == ["clean", "20 dB", "10 dB", "0 dB"]
    assert row["levels"][0] is None and row["accuracy"][0] == report["metrics"]["accuracy"]
    assert (trained_run / row["plot"]).stat().st_size > 1000
    markdown = (trained_run / "report.md").read_text()
    assert "## Robustness" in markdown and f"]({row['plot']})" in markdown
    assert "audio/white_noise    relative robustness" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_robustness_report_curves_match_clean_and_ablation(trained_run, capsys):
    assert cli.main(["evaluate", str(trained_run), "--robustness", "--robustness-seed", str(SEED)]) == 0
    shutil.copy(trained_run / "report.md", Path(os.environ.get("MMTF_ROBUSTNESS_REPORT", os.devnull)))
    report = json.loads((trained_run / "report.json").read_text())
    section = report["robustness"]
    names = [row["name"] for row in section["degradations"]]
    assert names == list(deg.DEGRADATIONS)  # the tiny run has all three modalities
    ablation = {row["setting"]: row["accuracy"] for row in report["ablation"]}
    assert section["clean_accuracy"] == report["metrics"]["accuracy"]
    for row in section["degradations"]:
        assert row["accuracy"][0] == report["metrics"]["accuracy"]  # level 0 = clean
        assert len(row["accuracy"]) == len(row["levels"]) and 0 <= row["relative_robustness"] <= 1
        assert (trained_run / row["plot"]).stat().st_size > 1000
        if row["name"].endswith("/missing"):
            assert row["accuracy"][-1] == ablation[f"without {row['modality']}"]
    levels = section["degradations"][names.index("audio/white_noise")]["levels"]
    assert levels[0] is None and not any(isinstance(v, float) and math.isinf(v) for v in levels)
    markdown = (trained_run / "report.md").read_text()
    assert "## Robustness" in markdown and "| image/occlusion | 0 / 0.1 / 0.25 / 0.5 |" in markdown
    assert "relative robustness" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_effective_robustness_against_itself_is_zero(trained_run):
    argv = [
        "evaluate",
        str(trained_run),
        "--no-ablation",
        "--degradations",
        "image/occlusion",
        "text/missing",
    ]
    assert cli.main([*argv, "--robustness-baseline", str(trained_run)]) == 0
    section = json.loads((trained_run / "report.json").read_text())["robustness"]
    assert [r["name"] for r in section["degradations"]] == ["image/occlusion", "text/missing"]
    for row in section["degradations"]:
        assert row["baseline_accuracy"] == row["accuracy"] and row["effective_robustness"] == 0.0


def test_cli_unknown_degradation_fails_naming_it(trained_run, capsys):
    assert cli.main(["evaluate", str(trained_run), "--degradations", "image/rain"]) == 2
    assert "unknown degradation 'image/rain'" in capsys.readouterr().err
