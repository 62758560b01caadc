"""The base class of every error this package raises on purpose.

Each module keeps its own error class (``CheckpointError``, ``ConversionError``, ...) for callers
that handle one kind; all of them derive from :class:`NVFP4Error`, so the CLI (and any other
caller) can tell a reported problem with the input or the run from a bug with one ``except``.
The classes also keep their builtin base (``ValueError`` or ``RuntimeError``) so existing
``except ValueError`` handlers still catch them.
"""

from __future__ import annotations


class NVFP4Error(Exception):
    """A problem with the input, the options or the environment, reported with a message that
    names what is wrong (file, tensor, option); not a bug in nvfp4_jax."""


class UsageError(NVFP4Error, ValueError):
    """An option or input value the run cannot use (a non-positive size, no calibration data, a
    missing companion option); the message names the option."""


__all__ = ["NVFP4Error", "UsageError"]
