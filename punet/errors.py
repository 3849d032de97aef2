"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations


class PunetError(Exception):
    """A failure caused by the user's input or environment (exit code 1)."""


class UsageError(PunetError):
    """A bad command-line value (exit code 2)."""
