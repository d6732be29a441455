"""mmtf train --manifest without a config: inference, stacking, time budgets (mmtf train / mmtf tune)."""

import csv
import json
import time

import numpy as np
import pytest
from PIL import Image

from multimodal_tf import auto, autoconfig, cli, stacking, tuning
from multimodal_tf import config as config_lib
from multimodal_tf.budget import parse_duration
from multimodal_tf.data import profile as profile_lib
from multimodal_tf.data.audio_io import encode_wav16
from multimodal_tf.data.cache import prepare_data
from multimodal_tf.data.manifest import ManifestError
from multimodal_tf.models import build_model
from multimodal_tf.run_dir import load_trained_model
from multimodal_tf.testing import random_features, tiny_config

CLIP_SECONDS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0)


def write_manifest(folder, rows):
    path = folder / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "text", "audio", "label", "split"])
        writer.writerows(rows)
    return path


def known_manifest(folder, texts=("a small red thing", "the big blue box is here"), colour=False):
    """40 train rows, 5:1 imbalance, grey 48x80 images, clips of CLIP_SECONDS, no val split."""
    (folder / "media").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        image = f"media/{i}.png"
        pixels = rng.integers(0, 255, (48, 80, 3 if colour else 1)).astype(np.uint8)
        Image.fromarray(pixels if colour else pixels[..., 0]).save(folder / image)
        audio = f"media/{i}.wav"
        seconds = CLIP_SECONDS[i % len(CLIP_SECONDS)]
        (folder / audio).write_bytes(encode_wav16(np.zeros(int(seconds * 16000)), 16000))
        label = "rare" if i % 6 == 0 else "common"
        rows.append([f"r{i}", image, texts[i % len(texts)], audio, label, "train"])
    rows += [["t0", "media/0.png", texts[0], "media/0.wav", "common", "test"]]
    return write_manifest(folder, rows)


def test_parse_duration_accepts_units_and_rejects_the_rest():
    assert parse_duration("45") == 45 and parse_duration("30s") == 30
    assert parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    for bad in ("", "ten minutes", "-5m", "0", "5d"):
        with pytest.raises(ValueError, match="time budget"):
            parse_duration(bad)


def test_inference_recovers_sizes_lengths_durations_and_imbalance(tmp_path):
    profile = profile_lib.profile_manifest(known_manifest(tmp_path))
    assert profile.modalities == ("image", "text", "audio") and profile.train_examples == 40
    assert profile.class_counts == {"common": 33, "rare": 7} and not profile.has_val
    assert (profile.image["median_height"], profile.image["median_width"]) == (48, 80)
    assert profile.image["grey_share"] == 1.0
    assert profile.audio["p90_seconds"] == pytest.approx(np.percentile(CLIP_SECONDS * 4, 90))
    # "the big blue box is here": 6 words + their 2- to 4-grams; the shorter text has fewer.
    longest = profile_lib.ngram_token_count("the big blue box is here", (2, 4))
    assert longest == 6 + sum(3 * (len(w) + 2) - 6 for w in ["the", "big", "blue", "box", "is", "here"])
    assert profile.text["p95_tokens"] == longest

    config = autoconfig.infer_config(profile, str(tmp_path / "run"))
    assert (config.data.image.height, config.data.image.width, config.data.image.channels) == (19, 32, 1)
    assert config.model.image_encoder.colour_bins == 0  # grey: no colour histogram
    assert config.data.text.tokenizer == "ngrams" and config.data.text.ngram_range == (2, 4)
    assert config.data.text.max_tokens == -(-longest // 8) * 8
    assert config.data.audio.duration_seconds == 2.75  # p90 2.55 s, rounded up to 0.25 s
    assert config.train.class_weights == "balanced"  # 33 / 7 > 3
    assert config.data.validation_split == "stratified" and config.data.validation_fraction == 0.25
    assert config.model.text_encoder.name == autoconfig.TEXT_ENCODER["name"]
    assert config.model.modalities == ("image", "text", "audio")


def test_unspaced_script_colour_images_and_missing_modality(tmp_path):
    texts = ("今天天气很好", "我喜欢吃苹果和香蕉")
    manifest = known_manifest(tmp_path, texts=texts, colour=True)
    rows = list(csv.reader(open(manifest, encoding="utf-8")))
    for row in rows[1:]:
        row[3] = ""  # no audio at all
    manifest = write_manifest(tmp_path, rows[1:])
    profile = profile_lib.profile_manifest(manifest)
    config = autoconfig.infer_config(profile)
    assert config.model.modalities == ("image", "text")
    assert config.data.text.ngram_range == (1, 3)  # single characters carry meaning
    assert config.data.image.channels == 3 and config.model.image_encoder.colour_bins == 2  # 2^3 <= 40 / 4


def test_inferred_yaml_round_trips(tmp_path):
    config = autoconfig.infer_config(profile_lib.profile_manifest(known_manifest(tmp_path)))
    config_lib.save(config, tmp_path / "inferred.yaml")
    again = config_lib.load([tmp_path / "inferred.yaml"])
    assert again == config
    assert config_lib.to_dict(again) == config_lib.to_dict(config)


def test_bad_manifests_name_the_record_and_field(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        profile_lib.profile_manifest(tmp_path / "nope.csv")
    folder = tmp_path / "bad"
    folder.mkdir()
    manifest = write_manifest(
        folder, [["a", "", "hello", "", "x", "train"], ["b", "", "hi", "", "y", "later"]]
    )
    with pytest.raises(profile_lib.ProfileError, match=r"row 2 id=b split: 'later'"):
        profile_lib.profile_manifest(manifest)
    manifest = write_manifest(folder, [["a", "missing.png", "hello", "", "x", "train"]])
    with pytest.raises(profile_lib.ProfileError, match="missing.png"):
        profile_lib.profile_manifest(manifest)
    manifest = write_manifest(
        folder, [["a", "", "hello", "", "x", "train"], ["b", "", "hi", "", "x", "train"]]
    )
    with pytest.raises(profile_lib.ProfileError, match="at least 2 classes"):
        autoconfig.infer_config(profile_lib.profile_manifest(manifest))


def test_cli_reports_a_missing_manifest_and_a_bad_budget_in_one_line(tmp_path, capsys):
    assert cli.main(["train", "--manifest", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv does not exist" in capsys.readouterr().err
    manifest = known_manifest(tmp_path)
    assert cli.main(["train", "--manifest", str(manifest), "--time-budget", "soon"]) == 2
    assert "time budget 'soon'" in capsys.readouterr().err


def test_stratified_validation_holds_out_each_class_in_proportion(tmp_path):
    manifest = known_manifest(tmp_path)
    config = tiny_config(
        f"data.manifest={manifest}", "data.validation_fraction=0.25", "data.validation_split=stratified"
    )
    metadata = prepare_data(config.data, progress=False)
    assert metadata.counts["val"]["labels"] == {"common": 8, "rare": 2}  # round(0.25 * 33), round(0.25 * 7)
    assert metadata.counts["train"]["labels"] == {"common": 25, "rare": 5}


@pytest.mark.parametrize("combine", stacking.COMBINATIONS)
def test_stacked_model_computes_what_stacking_fitted(combine):
    """The assembled late-fusion model's output equals ``stacking.fuse`` of the per-modality models."""
    base = tiny_config(*stacking.LATE_FUSION, "model.fusion.hidden_dim=8", f"model.fusion.combine={combine}")
    models = {
        m: build_model(config_lib.replace(base, [f"model.modalities=[{m}]"]), 5, 50)
        for m in ("image", "audio")
    }
    config = config_lib.replace(base, ["model.modalities=[image, audio]"])
    x = random_features(config, batch_size=6)
    x["image_present"][:2] = 0  # audio only
    x["audio_present"][2:3] = 0  # image only
    probabilities = np.stack([m(stacking._inputs_of(m, x)).numpy() for m in models.values()], 1)
    presence = np.stack([x["image_present"], x["audio_present"]], 1)
    logits = np.array([0.0, 0.7])

    class Metadata:
        num_classes, vocabulary = 5, []

    config = config_lib.replace(config, ["data.text.tokenizer=ngrams", "data.text.hash_buckets=49"])
    stacked = stacking.assemble(config, Metadata, models, logits)
    expected = stacking.fuse(probabilities.astype(np.float64), presence, logits, combine)
    np.testing.assert_allclose(stacked(x).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(expected[:2], probabilities[:2, 1], atol=1e-6)  # one modality: its own output


@pytest.mark.slow  # ~45 s: a three-modality model's start-up alone is ~20 s on 2 loaded cores
def test_time_budget_is_honoured_and_the_best_so_far_kept(synth_manifest, tmp_path):
    budget = 40.0
    started = time.monotonic()
    result = auto.auto_train(synth_manifest, tmp_path / "run", budget, progress=False)
    wall = time.monotonic() - started
    assert wall <= 1.1 * budget, f"{wall:.1f} s for a {budget} s budget"
    trained = [c for c in result.candidates if c.val_loss is not None]
    assert trained and result.kept in [c.name for c in trained]
    report = json.loads((tmp_path / "run" / auto.CANDIDATES_JSON).read_text())
    assert report["kept"] == result.kept and len(report["candidates"]) == len(result.candidates)
    _, metadata, model = load_trained_model(tmp_path / "run")  # the kept model, a normal run directory
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    kept = next(c for c in result.candidates if c.name == result.kept)
    assert metrics["val"]["loss"] == pytest.approx(kept.val_loss, rel=1e-3)


@pytest.mark.slow
def test_no_config_cli_trains_stacks_keeps_the_best_and_exports(synth_manifest, tmp_path, capsys):
    from multimodal_tf.export import export_run  # noqa: PLC0415
    from multimodal_tf.serving.local import LocalModel  # noqa: PLC0415

    out = tmp_path / "run"
    assert (
        cli.main(
            ["train", "--manifest", str(synth_manifest), "--output-dir", str(out), "--time-budget", "3m"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "data.image.height=32" in printed and "kept" in printed
    report = json.loads((out / auto.CANDIDATES_JSON).read_text())
    names = {row["name"]: row for row in report["candidates"]}
    assert {"image", "text", "audio", "concat", "late_mean", "late_product"} <= set(names)
    fusions = [
        row for row in report["candidates"] if row["kind"] != "modality" and row["val_loss"] is not None
    ]
    assert report["kept"] == min(fusions, key=lambda row: row["val_loss"])["name"]
    assert report["seconds"] <= 1.1 * 180
    inferred = config_lib.load([out / auto.INFERRED_FILE])
    assert inferred.model.modalities == ("image", "text", "audio")
    path = export_run(out, tmp_path / "models", "auto")
    row = next(csv.DictReader(open(synth_manifest, encoding="utf-8")))
    folder = synth_manifest.parent
    outputs = LocalModel(path).predict(
        images=[str(folder / row["image"]) if row["image"] else ""],
        texts=[row["text"]],
        audios=[str(folder / row["audio"]) if row["audio"] else ""],
    )
    assert outputs["probabilities"].shape == (1, 8)


# slow: a real tuner search against a clock (~18 s); keeps the default run under 15 min
@pytest.mark.slow
def test_tune_time_budget_stops_the_search_and_keeps_the_best_trial(synth_manifest, tmp_path):
    config = tiny_config(f"data.manifest={synth_manifest}", "model.modalities=[image]", "train.epochs=50")
    prepare_data(config.data, progress=False)
    budget = 30.0  # a tiny model's first trial takes ~15 s to reach its first step on 2 loaded cores
    started = time.monotonic()
    result = tuning.tune(config, "random", 100, tmp_path, progress=False, time_budget=budget)
    wall = time.monotonic() - started
    assert wall <= 1.1 * budget, f"{wall:.1f} s for a {budget} s budget"
    assert 1 <= result.num_trials < 100 and result.best_score is not None


@pytest.mark.slow  # ~30 s alone; start-up plus one epoch must fit the budget, which a loaded machine breaks
def test_configured_run_time_budget_bounds_the_whole_command(synth_manifest, tmp_path):
    """``mmtf train --config C --time-budget``: the command, finishing work included, ends within 10 %."""
    out = tmp_path / "run"
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        "model.modalities=[image]",
        "train.epochs=100000",
        "train.calibration=temperature",
        f"train.output_dir={out}",
    )
    config_lib.save(config, tmp_path / "config.yaml")
    prepare_data(config.data, progress=False)
    budget = 25.0  # a tiny model reaches its first step in ~10 s on 2 loaded cores
    started = time.monotonic()
    assert cli.main(["train", "--config", str(tmp_path / "config.yaml"), "--time-budget", "25s"]) == 0
    wall = time.monotonic() - started
    assert wall <= 1.1 * budget, f"{wall:.1f} s for a {budget} s budget"
    history = json.loads((out / "history.json").read_text())
    assert 1 < len(history["val_loss"]) < 100000  # trained several epochs, and the budget stopped it
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val", "test", "calibration"} <= set(metrics)
