"""One registry for everything that is chosen by name from a config.

An entry may carry its own config class (Model Garden's one-of pattern): the
frozen dataclass of the fields that family takes, declared next to the layer
and registered with it. ``config.load`` uses it to accept only that family's
fields under a config key whose ``name`` selects the family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps keys such as ``"image/cnn"`` or ``"attention"`` to objects and their configs.

    Registering a key twice raises; looking up an unknown key lists the known
    ones, so a typo in a YAML config fails with a useful message.
    """

    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}
        self._configs: dict[str, type] = {}

    def register(self, key: str, config: type | None = None) -> Callable[[T], T]:
        """Decorator registering an object under ``key``, with its config class if given.

        Args:
            key: the name a config uses to select the object.
            config: a frozen dataclass whose ``name`` field defaults to ``key``.
        """
        if config is not None:
            _check_config_class(key, config)

        def decorator(obj: T) -> T:
            if key in self._entries:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            if config is not None:
                self._configs[key] = config
            return obj

        return decorator

    def get(self, key: str) -> T:
        if key not in self._entries:
            raise KeyError(self._unknown(key))
        return self._entries[key]

    def config(self, key: str) -> type:
        """The config class registered with ``key``."""
        if key not in self._configs:
            raise KeyError(self._unknown(key))
        return self._configs[key]

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _unknown(self, key: str) -> str:
        known = ", ".join(sorted(self._entries)) or "(none)"
        return f"unknown {self.kind} {key!r}; known: {known}. {self.hint}".strip()


def _check_config_class(key: str, config: type) -> None:
    params = getattr(config, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"config class of {key!r} must be a frozen dataclass, got {config!r}")
    name = {f.name: f for f in dataclasses.fields(config)}.get("name")
    if name is None or name.default != key:
        raise TypeError(f"config class {config.__name__} of {key!r} must have a field name = {key!r}")


ENCODERS: Registry = Registry("encoder", "Encoders live in multimodal_tf.encoders.")
FUSIONS: Registry = Registry("fusion", "Fusion layers live in multimodal_tf.fusion.")
