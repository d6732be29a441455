import pytest

from multimodal_tf import config as config_lib
from multimodal_tf.config import ConfigError


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


def test_every_pipeline_yaml_loads():
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
