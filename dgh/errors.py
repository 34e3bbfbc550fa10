"""Helpers for the one-line error messages every entry point shows (never a traceback)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of some messages


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``str(exc)`` without terminal colour codes (at most ``limit`` characters), or the
    exception's class name. A pydantic ``ValidationError`` gives :func:`validation_error_line`."""
    if isinstance(exc, ValidationError):
        return validation_error_line(exc)[:limit]
    for line in _ANSI.sub("", str(exc)).strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-after")) or "<root>"


def validation_error_line(exc: ValidationError) -> str:
    """The first error of a pydantic ``ValidationError`` as one line: ``unknown key `a.b```, ``missing key `a```, or
    ```a.b`: <message> (got <value>)`` -- without pydantic's type codes and documentation links."""
    err = exc.errors()[0]
    loc = _format_loc(err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown key `{loc}`"
    if kind == "missing":
        return f"missing key `{loc}`"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"`{loc}`: {msg}{shown}" if loc != "<root>" else msg
