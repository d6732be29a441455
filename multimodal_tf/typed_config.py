"""Typed config machinery: checked fields, one-of families, dict <-> dataclass, layered merges.

:mod:`multimodal_tf.config` declares the schema with these pieces. A
:class:`OneOf` base (Model Garden's one-of pattern) names a registry whose
entries each carry their own config dataclass, a subclass of the base: the
``name`` field picks the family and only its fields are accepted.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, ClassVar

from multimodal_tf.registry import Registry


class ConfigError(ValueError):
    """Raised for unknown keys or values of the wrong type."""


class ConfigFieldError(ConfigError):
    """A bad value of one field, raised while a config dataclass is built.

    ``from_dict`` turns it into a :class:`ConfigError` naming the full key.
    """

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class MissingFileError(ConfigFieldError):
    """A field names a local file or folder that does not exist.

    ``config.load`` checks it on the resolved config only: a later layer (a
    second ``--config`` file or a ``--set``) may point the field at a file
    that does exist, as an overlay of tiny stand-in checkpoints does.
    """


def option(default: Any, *, choices: tuple = (), minimum: float | None = None) -> Any:
    """A dataclass field whose value is checked when the config is built.

    Args:
        default: the default value.
        choices: the allowed values (enum-like strings); empty: any.
        minimum: the smallest allowed number; None: any.
    """
    return dataclasses.field(default=default, metadata={"choices": tuple(choices), "minimum": minimum})


class Checked:
    """Mixin of the config dataclasses: checks every :func:`option` field on construction."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            choices = field.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigFieldError(field.name, f"expected one of {list(choices)}, got {value!r}")
            minimum = field.metadata.get("minimum")
            if minimum is not None and value < minimum:
                raise ConfigFieldError(field.name, f"must be >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OneOf(Checked):
    """Base of a one-of config; a subclass that sets ``registry`` is the base of its families.

    Attributes:
        registry: the registry whose entries' config classes are the families.
        families_package: the package whose import registers them.
        common: fields every family has that are not layer arguments.
    """

    registry: ClassVar[Registry]
    families_package: ClassVar[str]
    common: ClassVar[tuple[str, ...]] = ("name",)

    name: str = ""

    def layer_arguments(self) -> dict[str, Any]:
        """The family's own fields: the constructor arguments of its layer."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.common}


def registry_of(base: Any) -> Registry | None:
    """The registry whose families subclass one-of base ``base`` (importing them), or None."""
    if not (isinstance(base, type) and issubclass(base, OneOf) and "families_package" in base.__dict__):
        return None
    importlib.import_module(base.families_package)
    return base.registry


def family_config(base: type, name: str, key: str = "") -> type:
    """The config class of family ``name`` (a subclass of ``base``); ``key`` names it in errors."""
    try:
        return registry_of(base).config(name)
    except KeyError as e:
        raise ConfigError(f"{key + '.' if key else ''}name: {e.args[0]}") from None


def default_family(base: type, name: str) -> Any:
    """A dataclass field defaulting to family ``name``'s default config (built lazily)."""
    return dataclasses.field(default_factory=lambda: family_config(base, name)())


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is tuple:
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _default_name(field: dataclasses.Field) -> str:
    """The family a one-of field selects by default."""
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return default.name


def _from_family_dict(base: type, data: Any, path: str, default_name: str) -> Any:
    """A family config under a one-of field: ``name`` (or the default) picks the class."""
    if isinstance(data, base):
        expected = family_config(base, data.name, path)
        if type(data) is not expected:
            raise ConfigError(f"{path}: {data.name!r} takes a {expected.__name__}, got {type(data).__name__}")
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    name = _coerce(data.get("name", default_name), str, f"{path}.name")
    return from_dict(family_config(base, name, path), {**data, "name": name}, path)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Builds dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(_unknown_key_message(cls, key_path))
        if registry_of(hints[key]) is not None:
            kwargs[key] = _from_family_dict(hints[key], value, key_path, _default_name(fields[key]))
        else:
            kwargs[key] = _coerce(value, hints[key], key_path)
    try:
        return cls(**kwargs)
    except ConfigFieldError as e:
        key = f"{path + '.' if path else ''}{e.key}"
        if isinstance(e, MissingFileError):  # keeps its type, so ``config.load`` can tell it apart
            raise MissingFileError(key, e.reason) from None
        raise ConfigError(f"{key}: {e.reason}") from None


def _unknown_key_message(cls: type, key_path: str) -> str:
    names = ", ".join(sorted(_field_names(cls)))
    if issubclass(cls, OneOf):
        family = cls.__dataclass_fields__["name"].default
        return f"unknown config key {key_path!r}: {family!r} takes only {names}"
    return f"unknown config key {key_path!r}; known: {names}"


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples become lists) for YAML/JSON; a family config has only its fields."""

    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def merge_plain(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_plain(merged[key], value)
        else:
            merged[key] = value
    return merged


def merge(base: dict, update: dict, cls: type, strict: bool) -> dict:
    """``update`` merged into ``base``, both partial dicts of dataclass ``cls``.

    Nested configs merge key by key; a one-of field goes through
    :func:`_merge_family`. Keys ``cls`` lacks pass through for ``from_dict``
    to report with their full path.
    """
    merged = dict(base)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in update.items():
        hint = hints.get(key)
        old = merged.get(key) if isinstance(merged.get(key), dict) else {}
        if isinstance(value, dict) and registry_of(hint) is not None:
            merged[key] = _merge_family(old, value, hint, _default_name(fields[key]), strict)
        elif isinstance(value, dict) and dataclasses.is_dataclass(hint):
            merged[key] = merge(old, value, hint, strict)
        else:
            merged[key] = value
    return merged


def _merge_family(base: dict, update: dict, config_base: type, default_name: str, strict: bool) -> dict:
    """Merges a layer into a one-of config without leaking one family's fields into another.

    When ``update`` switches the family, only the fields the new family also
    takes carry over from ``base``. With ``strict=False`` (tuning: one search
    space over several families), a field of ``update`` that the chosen
    family lacks but another family takes is skipped instead of rejected.
    """
    old_name = base.get("name", default_name)
    new_name = update.get("name", old_name)
    if not isinstance(new_name, str):
        return {**base, **update}  # from_dict reports the type
    try:
        fields = set(_field_names(registry_of(config_base).config(new_name)))
    except KeyError:
        return {**base, **update}  # from_dict reports the unknown family with its path
    if new_name != old_name:
        base = {k: v for k, v in base.items() if k in fields}
    if not strict:
        registry = registry_of(config_base)
        other = {f for key in registry.keys() for f in _field_names(registry.config(key))} - fields
        update = {k: v for k, v in update.items() if k not in other}
    return {**base, **update}
