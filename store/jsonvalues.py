"""The JSON a task row holds (its arguments and result): what may be stored, and how a
stored value is shown.

A value is storable when every client can read it back as it was written: JSON in UTF-8
has no NaN or infinity and no lone surrogate, and a value nested deeper than `MAX_DEPTH`
is refused before anything recurses through it (parsers, validators and encoders each have
a recursion limit of their own, and a request must not find it). Enqueues and results are
checked with `problem`; a row written before these checks, or by hand, is read through
`loads` and shown through `escaped`, so that no stored value can make a read fail.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Arrays and objects inside one argument or result, counting that value itself as level 1.
MAX_DEPTH = 64

_CONTAINERS = (list, tuple, set, frozenset, dict)


def problem(value: Any) -> str | None:
    """Why `value` cannot be stored as JSON every client reads back, naming where in it the
    trouble lies (`[0]['key']`); None when it can."""
    found = _problem(value, 0)
    if found is None:
        return None
    what, path = found
    return what + (" at " + "".join(reversed(path)) if path else "")


# What is wrong, and the path to it, innermost step first (built only on the way out).
_Found = tuple[str, list[str]]


def _problem(value: Any, depth: int) -> _Found | None:
    # Recursion stops at MAX_DEPTH, so a cyclic or very deep value is refused, not followed.
    if isinstance(value, str):
        return None if _encodable(value) else ("a lone surrogate in a string", [])
    if isinstance(value, float):
        return None if math.isfinite(value) else (_float_text(value), [])
    if not isinstance(value, _CONTAINERS):
        return None
    if depth >= MAX_DEPTH:
        return f"arrays or objects nested deeper than {MAX_DEPTH} levels", []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _encodable(key):
                return f"a lone surrogate in the key {key!r}", []
            found = _problem(item, depth + 1)
            if found is not None:
                found[1].append(f"[{key!r}]")
                return found
        return None
    for index, item in enumerate(value):
        found = _problem(item, depth + 1)
        if found is not None:
            found[1].append(f"[{index}]")
            return found
    return None


def decode_text(raw: bytes) -> str:
    """Text as SQLite hands it over, UTF-8 or not: a byte that is not UTF-8 (a row written by
    hand) becomes a lone surrogate, `\\udcXX`, which `escaped` shows and `problem` refuses."""
    return raw.decode("utf-8", "surrogateescape")


def loads(stored: str | bytes) -> Any:
    """A JSON column's stored text as Python data; text that is not JSON (a row written by
    hand) is returned as that text, a string."""
    text = decode_text(stored) if isinstance(stored, bytes) else stored
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def escaped(value: Any, outer: int = 0) -> Any:
    """`value` with everything JSON in UTF-8 cannot carry made showable: a lone surrogate as
    its backslash escape, a NaN or infinity as the string `"NaN"`, `"Infinity"` or
    `"-Infinity"`, an array or object deeper than `MAX_DEPTH` as its JSON text. `outer` is
    how many levels wrap the values the limit counts (1 for a list of arguments). A clean
    value is returned as it is, not copied."""
    return _escaped(value, -outer)


def _escaped(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return value if _encodable(value) else _shown(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else _float_text(value)
    if isinstance(value, list):
        if depth >= MAX_DEPTH:
            return _as_text(value)
        items = [_escaped(item, depth + 1) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return _as_text(value)
        pairs = {_escaped(k, depth + 1): _escaped(v, depth + 1) for k, v in value.items()}
        same = len(pairs) == len(value) and all(
            key in value and value[key] is item for key, item in pairs.items()
        )
        return value if same else pairs
    return value


def escaped_text(text: str) -> str:
    """`text` with any lone surrogate as its backslash escape (a message that quotes input)."""
    return text if _encodable(text) else _shown(text)


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _float_text(number: float) -> str:
    if math.isnan(number):
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"


def _as_text(value: Any) -> str:
    try:
        return escaped_text(json.dumps(value))
    except (RecursionError, ValueError, TypeError):
        return "<nested too deep to show>"
