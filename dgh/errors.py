"""Helpers for the one-line error messages every entry point shows (never a traceback)."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of some messages


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``str(exc)`` without terminal colour codes (at most ``limit`` characters), or the
    exception's class name."""
    for line in _ANSI.sub("", str(exc)).strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__
