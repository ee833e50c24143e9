"""The one exception for bad input.

``SaediffError`` is what a user can fix: a missing file, a malformed row, an unknown key, a shape
that does not fit, a server that refuses. Its message is one line naming the file, key, row or
shape at fault; the CLI prints it without a traceback and exits 1. Every other exception is a bug
(or an out-of-memory) and keeps its traceback.

The subclasses keep the built-in type a caller may already catch (``FileNotFoundError``,
``KeyError``), so ``except FileNotFoundError`` still works.
"""

from __future__ import annotations

__all__ = ["MissingFileError", "SaediffError", "UnknownKeyError"]


class SaediffError(ValueError):
    """Bad input: one line naming the file, key, row or shape at fault."""


class MissingFileError(SaediffError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks a required file)."""


class UnknownKeyError(SaediffError, KeyError):
    """A name the user gave (hook, preset, key) is not among the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""
