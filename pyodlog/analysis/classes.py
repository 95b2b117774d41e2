"""Class names for analysis output: the logged names where known, the bare label otherwise."""

from __future__ import annotations

from typing import Any

__all__ = ["class_name", "label_names"]


def class_name(names: list[str] | None, label: int) -> str:
    """The name of ``label`` (``names[label]`` when it is known and not empty), else ``str(label)``."""
    label = int(label)
    if names is not None and 0 <= label < len(names) and names[label]:
        return names[label]
    return str(label)


def label_names(data: Any, labels: Any) -> list[str]:
    """The names of ``labels`` for a ResultData (or view), from its ``class_names``."""
    names = getattr(data, "class_names", None)
    return [class_name(names, int(label)) for label in labels]
