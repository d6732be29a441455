"""One registry for everything that is chosen by name from a config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps keys such as ``"image/cnn"`` or ``"fusion/attention"`` to objects.

    Registering a key twice raises; looking up an unknown key lists the known
    ones, so a typo in a YAML config fails with a useful message.
    """

    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}

    def register(self, key: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if key in self._entries:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, key: str) -> T:
        if key not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {key!r}; known: {known}. {self.hint}".strip())
        return self._entries[key]

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries


ENCODERS: Registry = Registry("encoder", "Encoders live in multimodal_tf.encoders.")
FUSIONS: Registry = Registry("fusion", "Fusion layers live in multimodal_tf.fusion.")
