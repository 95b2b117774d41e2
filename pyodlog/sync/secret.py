"""A credential that never shows: the API key the client sends and nothing else may print."""

from __future__ import annotations

__all__ = ["Secret"]


class Secret:
    """Holds a credential so that no repr, str, vars() dump or log line shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The credential, for the one place that sends it (an Authorization header)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a Secret cannot be pickled: pass the key again where it is needed")
