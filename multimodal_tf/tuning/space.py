"""The search space: hyperparameter specs and how their values become config overrides.

A hyperparameter is a config override: the search space (``search_space`` in
an experiment YAML, e.g. pipelines/search_space.yaml) maps each
hyperparameter name to a spec::

    learning_rate: {type: float, min: 1.0e-4, max: 1.0e-2, sampling: log, key: train.learning_rate}
    fusion: {type: choice, values: [concat, gated], key: model.fusion.name}
    dropout: {type: float, min: 0.0, max: 0.5, step: 0.1,
              key: [model.head.dropout_rate, model.fusion.dropout_rate]}

``type`` is ``choice`` (``values``, optional ``ordered``), ``int`` or
``float`` (``min``, ``max``, optional ``step``, ``sampling``:
linear | log | reverse_log) or ``boolean``; ``key`` is one config key path or
a list of them (one value sets them all).
"""

from __future__ import annotations

from typing import Any

import yaml

from multimodal_tf import config as config_lib
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.registry import FUSIONS

SPEC_TYPES = ("choice", "int", "float", "boolean")
SPEC_FIELDS = {"type", "key", "values", "ordered", "min", "max", "step", "sampling"}


def default_search_space(config: ExperimentConfig) -> dict[str, dict]:
    """Encoder widths/depths of the configured modalities, fusion, dropout, LR, batch size.

    pipelines/search_space.yaml spells the same space out for editing.
    """
    import multimodal_tf.fusion  # noqa: F401  (registers every fusion family)

    space: dict[str, dict] = {}
    for modality in config.model.modalities:
        key = f"model.{modality}_encoder"
        low, high = (1, 2) if modality == "text" else (2, 3)  # recurrent layers vs conv blocks
        space[f"{modality}_width"] = dict(type="choice", values=[16, 32, 64], key=f"{key}.width")
        space[f"{modality}_depth"] = dict(type="int", min=low, max=high, key=f"{key}.depth")
    space["fusion"] = dict(type="choice", values=FUSIONS.keys(), key="model.fusion.name")
    dropout_keys = ["model.head.dropout_rate", "model.fusion.dropout_rate"]
    space["dropout_rate"] = dict(type="float", min=0.0, max=0.5, step=0.1, key=dropout_keys)
    modality_keys = [f"model.modality_dropout.{m}" for m in config.model.modalities]
    space["modality_dropout"] = dict(type="float", min=0.0, max=0.3, step=0.1, key=modality_keys)
    space["learning_rate"] = dict(type="float", min=1e-4, max=1e-2, sampling="log", key="train.learning_rate")
    space["batch_size"] = dict(type="choice", values=[16, 32, 64], key="data.batch_size")
    return space


def _keys(name: str, spec: dict) -> list[str]:
    keys = spec.get("key")
    keys = [keys] if isinstance(keys, str) else keys
    if not keys or not all(isinstance(k, str) for k in keys):
        raise config_lib.ConfigError(f"search_space.{name}.key: expected a config key path or a list of them")
    return list(keys)


def declare(hp, name: str, spec: dict):
    """Declares hyperparameter ``name`` from its spec on ``hp``; returns its value."""
    where = f"search_space.{name}"
    if not isinstance(spec, dict):
        raise config_lib.ConfigError(f"{where}: expected a mapping, got {spec!r}")
    unknown = set(spec) - SPEC_FIELDS
    if unknown or spec.get("type") not in SPEC_TYPES:
        raise config_lib.ConfigError(
            f"{where}: type must be one of {SPEC_TYPES} (got {spec.get('type')!r}); "
            f"unknown fields {sorted(unknown)}; known: {sorted(SPEC_FIELDS)}"
        )
    _keys(name, spec)
    kind = spec["type"]
    try:
        if kind == "choice":
            return hp.Choice(name, list(spec["values"]), ordered=spec.get("ordered"))
        if kind == "boolean":
            return hp.Boolean(name)
        number = int if kind == "int" else float
        step = spec.get("step")
        step = None if step is None else number(step)
        method = hp.Int if kind == "int" else hp.Float
        return method(
            name, number(spec["min"]), number(spec["max"]), step=step, sampling=spec.get("sampling", "linear")
        )
    except (KeyError, TypeError, ValueError) as e:
        raise config_lib.ConfigError(f"{where}: invalid {kind} spec {spec!r}: {e}") from None


def _yaml_scalar(value: Any) -> str:
    """A scalar as ``--set`` text that YAML reads back as the same value (1e-4 stays a float)."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def apply_values(config: ExperimentConfig, space: dict, values: dict) -> ExperimentConfig:
    """The config with each hyperparameter's value written to its key(s).

    A key of a field that the trial's encoder or fusion family lacks (e.g.
    ``model.fusion.dropout_rate`` when ``concat`` is chosen) is skipped.
    """
    overrides = [
        f"{key}={_yaml_scalar(values[name])}" for name, spec in space.items() for key in _keys(name, spec)
    ]
    return config_lib.replace(config, overrides, strict=False)
