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
