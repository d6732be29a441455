import dataclasses
from pathlib import Path

import pytest

from multimodal_tf import config as config_lib
from multimodal_tf.config import ConfigError

PIPELINES = Path(__file__).parents[1] / "pipelines"


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  fusion:\n    name: gated\n")
    config = config_lib.load([path], ["train.epochs=5", "model.modalities=[image, audio]"])
    assert config.train.epochs == 5  # override beats YAML
    assert config.model.fusion.name == "gated"  # YAML beats default
    assert config.model.modalities == ("image", "audio")
    assert config.train.learning_rate == config_lib.TrainConfig().learning_rate


def test_unknown_key_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match="model.fusoin"):
        config_lib.load([], ["model.fusoin.name=x"])
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  imag:\n    height: 3\n")
    with pytest.raises(ConfigError, match="data.imag"):
        config_lib.load([path])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        config_lib.load([], ["train.epochs=many"])
    with pytest.raises(ConfigError, match="not of the form"):
        config_lib.load([], ["train.epochs"])


def test_save_and_reload_round_trip(tmp_path):
    config = config_lib.load([], ["data.image.height=20", "model.head.hidden_units=[8, 4]"])
    config_lib.save(config, tmp_path / "c.yaml")
    assert config_lib.load([tmp_path / "c.yaml"]) == config


@pytest.fixture
def pretrained_placeholders(tmp_path, monkeypatch):
    """Runs in a folder holding an empty ``pretrained/resnet50v2_notop.h5``.

    pipelines/pretrained.yaml names downloaded files, and loading a config
    checks only that its weights file exists (the file is read when the model
    is built; tests/test_pretrained_pipeline.py builds and trains the pipeline
    on tiny stand-ins).
    """
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "resnet50v2_notop.h5").touch()
    monkeypatch.chdir(tmp_path)


def test_every_pipeline_yaml_loads(pretrained_placeholders):
    from pathlib import Path

    paths = sorted((Path(__file__).parents[1] / "pipelines").glob("*.yaml"))
    assert paths, "pipelines/ has no experiment configs"
    for path in paths:
        config_lib.load([path])


def test_repeated_config_flags_layer_in_order(tmp_path):
    """`mmtf train --config base.yaml --config overlay.yaml --set ...`: later wins."""
    from multimodal_tf import cli

    (tmp_path / "base.yaml").write_text(
        "train:\n  epochs: 3\n  learning_rate: 0.1\nmodel:\n  ensemble_size: 2\n"
    )
    (tmp_path / "overlay.yaml").write_text("model:\n  ensemble_size: 5\n")
    args = cli.build_parser().parse_args(
        [
            "train",
            "--config",
            str(tmp_path / "base.yaml"),
            "--config",
            str(tmp_path / "overlay.yaml"),
            "--set",
            "train.epochs=4",
        ]  # fmt: skip
    )
    config = cli._config(args)
    assert (config.model.ensemble_size, config.train.epochs, config.train.learning_rate) == (5, 4, 0.1)


def test_emoji3_ensemble_overlay_changes_only_what_it_says():
    from pathlib import Path

    pipelines = Path(__file__).parents[1] / "pipelines"
    base = config_lib.load([pipelines / "emoji3.yaml"])
    layered = config_lib.load([pipelines / "emoji3.yaml", pipelines / "emoji3_ensemble.yaml"])
    assert layered.model.ensemble_size == 7 and layered.model.fusion == base.model.fusion
    assert (
        layered.model.image_encoder == base.model.image_encoder
        and layered.model.text_encoder == base.model.text_encoder
        and layered.data == base.data
        and layered.train.monitor == base.train.monitor
    )
    # The audio encoder changes kind and size; what the overlay leaves out stays.
    audio = layered.model.audio_encoder
    assert (audio.name, audio.width, audio.depth) == ("audio/stats", 64, 1)
    assert (audio.output_dim, audio.dropout_rate) == (
        base.model.audio_encoder.output_dim,
        base.model.audio_encoder.dropout_rate,
    )


# === Per-family encoder and fusion configs ===


def test_a_field_of_another_family_is_an_error_naming_the_key_and_the_family_fields():
    avmnist = PIPELINES / "avmnist.yaml"
    with pytest.raises(
        ConfigError, match="'model.audio_encoder.colour_bins': 'audio/cnn' takes only"
    ) as error:
        config_lib.load([avmnist], ["model.audio_encoder.colour_bins=6"])
    assert (
        "checkpoint, depth, dropout_rate, learning_rate_multiplier, name, output_dim, unfreeze_at_epoch, width"
        in str(error.value)
    )
    with pytest.raises(ConfigError, match="'model.audio_encoder.bidirectional': 'audio/cnn'"):
        config_lib.load([avmnist], ["model.audio_encoder.bidirectional=true"])
    with pytest.raises(
        ConfigError, match="'model.fusion.rank': 'late' takes only combine, dropout_rate, hidden_dim"
    ):
        config_lib.load([PIPELINES / "emoji3.yaml"], ["model.fusion.rank=4"])
    # The family's own fields are still accepted, on the default family too.
    assert config_lib.load([avmnist], ["model.audio_encoder.depth=2"]).model.audio_encoder.depth == 2
    assert config_lib.load([], ["model.image_encoder.width=48"]).model.image_encoder.width == 48


def test_a_yaml_field_of_another_family_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  text_encoder: {name: text/bow, bidirectional: true}\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown config key 'model.text_encoder.bidirectional'"):
        config_lib.load([path])


def test_cli_rejects_a_field_of_another_family_at_config_load(tmp_path):
    """The command exits non-zero before any data is read or model built."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "multimodal_tf.cli", "train", "--config", str(PIPELINES / "avmnist.yaml")]
        + ["--set", "model.audio_encoder.colour_bins=6", "--output-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PIPELINES.parent,
    )
    assert result.returncode != 0
    assert "model.audio_encoder.colour_bins" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.fusion={name: late, combine: median}", "model.fusion.combine: expected one of"),
        ("model.image_encoder.name=audio/cnn", "model.image_encoder.name: must name a 'image/...' encoder"),
        ("model.text_encoder.name=text/transformer", "model.text_encoder.name: unknown encoder"),
        ("model.head.type=ordinal", "model.head.type: expected one of"),
        ("data.image.resize=crop", "data.image.resize: expected one of"),
        ("data.text.tokenizer=bpe", "data.text.tokenizer: expected one of"),
        ("data.text.source=url", "data.text.source: expected one of"),
        ("train.lr_schedule=step", "train.lr_schedule: expected one of"),
        ("train.optimizer=adamax", "train.optimizer: expected one of"),
        ("train.strategy=horovod", "train.strategy: expected one of"),
        ("train.class_weights=inverse", "train.class_weights: expected one of"),
        ("train.mixed_precision=float16", "train.mixed_precision: expected one of"),
        ("model.modalities=[image,video]", "model.modalities: expected distinct names"),
        ("model.ensemble_size=0", "model.ensemble_size: must be >= 1"),
    ],
)
def test_enum_like_values_are_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{")):
        config_lib.load([], [override])


def test_switching_family_keeps_only_the_fields_the_new_family_takes(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        "model:\n  audio_encoder: {name: audio/lstm, bidirectional: true, width: 16, output_dim: 24}\n"
    )
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  audio_encoder: {name: audio/cnn}\n")
    audio = config_lib.load([base, overlay]).model.audio_encoder
    assert type(audio).__name__ == "AudioCNNConfig" and (audio.width, audio.output_dim) == (16, 24)
    assert "bidirectional" not in config_lib.to_dict(audio)
    # --set overrides are one layer: their order does not matter.
    for overrides in (
        ["model.fusion.name=tensor", "model.fusion.rank=8"],
        ["model.fusion.rank=8", "model.fusion.name=tensor"],
    ):
        fusion = config_lib.load([PIPELINES / "emoji3.yaml"], overrides).model.fusion
        assert (fusion.name, fusion.rank, fusion.hidden_dim) == ("tensor", 8, 64)
    # Back from late to concat: late's fields are gone, not ignored.
    concat = config_lib.load([PIPELINES / "emoji3.yaml"], ["model.fusion.name=concat"]).model.fusion
    assert config_lib.to_dict(concat) == {"name": "concat"}


def test_to_dict_has_only_the_family_fields_and_reloads_identically(tmp_path, pretrained_placeholders):
    for path in sorted(PIPELINES.glob("*.yaml")):
        config = config_lib.load([path])
        saved = config_lib.to_dict(config)
        for part in ("image_encoder", "text_encoder", "audio_encoder", "fusion"):
            family = getattr(config.model, part)
            assert set(saved["model"][part]) == {f.name for f in dataclasses.fields(family)}
        config_lib.save(config, tmp_path / "config.yaml")
        assert config_lib.load([tmp_path / "config.yaml"]) == config, path.name
    assert set(config_lib.to_dict(config_lib.ExperimentConfig())["model"]["audio_encoder"]) == {
        "name", "checkpoint", "learning_rate_multiplier", "unfreeze_at_epoch",
        "width", "depth", "output_dim", "dropout_rate"
    }  # fmt: skip


def test_non_strict_replace_skips_fields_only_other_families_take():
    """Tuning: one search space over several fusion families."""
    base = config_lib.load([PIPELINES / "emoji3.yaml"])  # text/bow, late
    overrides = ["model.fusion.name=concat", "model.fusion.dropout_rate=0.3", "model.text_encoder.depth=2"]
    with pytest.raises(ConfigError, match="model.text_encoder.depth|model.fusion.dropout_rate"):
        config_lib.replace(base, overrides)
    tuned = config_lib.replace(base, overrides, strict=False)
    assert tuned.model.fusion.name == "concat" and tuned.model.text_encoder == base.model.text_encoder
    with pytest.raises(ConfigError, match="model.fusion.widht"):
        config_lib.replace(base, ["model.fusion.widht=3"], strict=False)


def test_search_space_keys_map_onto_family_fields():
    """Every key of pipelines/search_space.yaml is a field of some family (or a plain config key)."""
    from multimodal_tf.registry import ENCODERS, FUSIONS

    config = config_lib.load([PIPELINES / "emoji3.yaml", PIPELINES / "search_space.yaml"])
    for spec in config.search_space.values():
        for key in [spec["key"]] if isinstance(spec["key"], str) else spec["key"]:
            *parents, field = key.split(".")
            if parents[-1].endswith("_encoder") or parents[-1] == "fusion":
                registry = FUSIONS if parents[-1] == "fusion" else ENCODERS
                prefix = "" if parents[-1] == "fusion" else parents[-1].split("_")[0] + "/"
                families = [k for k in registry.keys() if k.startswith(prefix)]
                assert any(
                    field in {f.name for f in dataclasses.fields(registry.config(k))} for k in families
                ), key
            for value in spec.get("values", [spec.get("min")]):
                if value is not None:
                    config_lib.replace(config, [f"{key}={value}"], strict=False)


LEGACY_MODEL = """
model:
  modalities: [image, audio]
  image_encoder: {name: image/cnn, width: 16, depth: 2, output_dim: 64, dropout_rate: 0.2, embedding_dim: 32,
                  bidirectional: false, augment: false, colour_bins: 0, linear: false, checkpoint: ''}
  text_encoder: {name: text/lstm, width: 32, depth: 2, output_dim: 64, dropout_rate: 0.1, embedding_dim: 32,
                 bidirectional: false, augment: false, colour_bins: 0, linear: false, checkpoint: ''}
  audio_encoder: {name: audio/cnn, width: 16, depth: 3, output_dim: 64, dropout_rate: 0.2, embedding_dim: 32,
                  bidirectional: false, augment: false, colour_bins: 0, linear: false, checkpoint: ''}
  fusion: {name: concat, hidden_dim: 64, num_heads: 4, rank: 4, combine: mean, dropout_rate: 0.1}
"""


def test_a_config_saved_before_per_family_configs_loads_leniently(tmp_path):
    """Run directories written with the one flat encoder/fusion config still reload (strict=False)."""
    path = tmp_path / "config.yaml"
    path.write_text(LEGACY_MODEL)
    with pytest.raises(ConfigError, match="unknown config key 'model.image_encoder.embedding_dim'"):
        config_lib.load([path])
    legacy = config_lib.load([path], strict=False).model
    avmnist = config_lib.load([PIPELINES / "avmnist.yaml"]).model
    for part in ("image_encoder", "text_encoder", "audio_encoder", "fusion"):
        assert getattr(legacy, part) == getattr(avmnist, part), part
