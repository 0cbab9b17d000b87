"""Durations as users write them: ``"90"``, ``"90s"``, ``"15m"``, ``"4h"``, ``"15d"``, ``"1h30m"``.

Format accepted by :func:`parse_duration` (case-insensitive, spaces between parts ignored):

* a plain non-negative number of seconds: ``"90"``, ``"0"``, ``"2.5"`` (or an ``int``/``float``);
* one or more ``<number><unit>`` parts with units ``d`` (days), ``h`` (hours), ``m`` (minutes)
  and ``s`` (seconds), each unit at most once and in that order: ``"1d12h"``, ``"1h30m"``,
  ``"1.5h"``.

:func:`format_duration` writes the canonical form: the largest units first, zero parts left out
(``5400 -> "1h30m"``, ``45 -> "45s"``, ``1296000 -> "15d"``, ``0 -> "0s"``), fractions of a
second rounded to the millisecond (``1.5 -> "1.5s"``). Invariant: for every non-negative whole
number of seconds ``x``, ``parse_duration(format_duration(x)) == x``; for whole milliseconds
the round trip holds up to float rounding.

Durations are ``float`` seconds everywhere in the domain: they are compared with timestamps
from ``time.time()``.
"""

from __future__ import annotations

import math
import re

from siterecovery.errors import InvalidInput

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0

ACCEPTED_FORMS = (
    'a number of seconds ("90") or parts with units d, h, m, s in that order '
    '("90s", "15m", "4h", "15d", "1h30m")'
)

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PARTS = re.compile(
    rf"(?:(?P<d>{_NUMBER})d)?(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m)?(?:(?P<s>{_NUMBER})s)?"
)
_PLAIN = re.compile(_NUMBER)
_UNIT_SECONDS = {"d": DAY, "h": HOUR, "m": MINUTE, "s": 1.0}


def _invalid(text: object, why: str) -> InvalidInput:
    return InvalidInput(f"duration {text!r} is not valid ({why}): use {ACCEPTED_FORMS}.")


def parse_duration(text: str | int | float) -> float:
    """Return the duration ``text`` in seconds.

    Raises :class:`~siterecovery.errors.InvalidInput` naming ``text`` and the accepted forms when
    it is empty, negative, not finite or not in one of the forms of the module docstring.
    """
    if isinstance(text, bool):
        # bool is an int subclass; True seconds is surely a mistake in a config file.
        raise _invalid(text, "a boolean is not a duration")
    if isinstance(text, int | float):
        value = float(text)
        if not math.isfinite(value):
            raise _invalid(text, "it is not finite")
        if value < 0:
            raise _invalid(text, "it is negative")
        return value
    if not isinstance(text, str):
        raise _invalid(text, f"a {type(text).__name__} is not a duration")
    compact = "".join(text.split()).lower()
    if not compact:
        raise _invalid(text, "it is empty")
    if compact.startswith("-"):
        raise _invalid(text, "it is negative")
    if _PLAIN.fullmatch(compact):
        return float(compact)
    match = _PARTS.fullmatch(compact)
    if match is None or not any(match.groupdict().values()):
        raise _invalid(text, "unrecognised form")
    total = 0.0
    for unit, number in match.groupdict().items():
        if number is not None:
            total += float(number) * _UNIT_SECONDS[unit]
    return total


def format_duration(seconds: float) -> str:
    """Return ``seconds`` in the canonical form of the module docstring (``"1h30m"``).

    Meant for display, so it never raises: negative values get a leading ``-`` and non-finite
    values are written as ``"inf"`` / ``"-inf"`` / ``"nan"``.
    """
    if isinstance(seconds, bool) or not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    millis = round(seconds * 1000)
    whole, frac_ms = divmod(millis, 1000)
    days, rest = divmod(whole, int(DAY))
    hours, rest = divmod(rest, int(HOUR))
    minutes, secs = divmod(rest, int(MINUTE))
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if frac_ms:
        parts.append(f"{secs}.{frac_ms:03d}".rstrip("0") + "s")
    elif secs or not parts:
        parts.append(f"{secs}s")
    return "".join(parts)
