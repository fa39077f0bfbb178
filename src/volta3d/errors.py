"""The project's one error type for bad input.

``InputError`` is bad input from the user: a file, a folder, a manifest, a label, a config key or
value, a combination of command-line options, a checkpoint or an export that does not fit. The
``volta3d`` command prints it as one line (no traceback) and exits with status 2; every other
exception is a bug and keeps its traceback.

It derives from ``ValueError``; the two subclasses also derive from the built-in type a caller may
already catch (a missing key or column, a missing file).
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: a file, a folder, a label, a config key or value; the CLI prints it as one line."""


class MissingInputError(InputError, KeyError):
    """A key or column the input lacks (also a ``KeyError``)."""

    # KeyError quotes its message ("'x'"); an input error reads as the plain sentence
    __str__ = InputError.__str__


class InputFileNotFound(InputError, FileNotFoundError):
    """A file or folder named by the user that does not exist (also a ``FileNotFoundError``)."""
