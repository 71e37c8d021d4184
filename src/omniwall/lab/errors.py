"""The lab's error type, apart so that every lab module (and the control plane) can raise it without
importing the `Lab` class."""

from __future__ import annotations


class LabError(RuntimeError):
    pass


__all__ = ["LabError"]
