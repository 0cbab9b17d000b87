"""Replication policy: RPO threshold, retention, crash- and app-consistent frequencies.

Ranges (ASR's, lower where a self-hosted datastore allows it), all inclusive:

============================  =================  =========
setting                       range              default
============================  =================  =========
RPO threshold                 5s to 24h          15m
retention                     1h to 15d          24h
crash-consistent frequency    5s to 1h           5m
app-consistent frequency      0 (off), 1h to 12h 4h
============================  =================  =========

Cross-field rules: the crash-consistent frequency is at most the retention, and the
app-consistent frequency (when on) is less than the retention (otherwise no app-consistent point
would ever be kept). Names are 1 to 64 characters from letters, digits, ``-``, ``_`` and ``.``;
the automatic failback twin (``<name>-failback``, ASR's convention) may exceed 64 by the length
of that suffix.

Invariant: every :class:`PolicySpec` instance is valid (``__post_init__`` checks), whether made
by :meth:`PolicySpec.create`, :meth:`PolicySpec.with_changes` or loaded from a store. Errors are
:class:`~siterecovery.errors.OutOfRange` / :class:`~siterecovery.errors.InvalidInput` naming
the setting, the value given (as a duration) and what is allowed.

Durations are float seconds; the ``*_s`` fields hold them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from siterecovery.domain.durations import DAY, HOUR, MINUTE, format_duration, parse_duration
from siterecovery.errors import InvalidInput, OutOfRange

RPO_THRESHOLD_MIN_S = 5.0
RPO_THRESHOLD_MAX_S = 24 * HOUR
RETENTION_MIN_S = 1 * HOUR
RETENTION_MAX_S = 15 * DAY
CRASH_INTERVAL_MIN_S = 5.0
CRASH_INTERVAL_MAX_S = 1 * HOUR
APP_INTERVAL_MIN_S = 1 * HOUR
APP_INTERVAL_MAX_S = 12 * HOUR
APP_INTERVAL_OFF = 0.0

DEFAULT_RPO_THRESHOLD_S = 15 * MINUTE
DEFAULT_RETENTION_S = 24 * HOUR
DEFAULT_CRASH_INTERVAL_S = 5 * MINUTE
DEFAULT_APP_INTERVAL_S = 4 * HOUR

NAME_MAX_LEN = 64
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
FAILBACK_SUFFIX = "-failback"

#: User-facing setting name -> (min, max) in seconds, for CLI help and API schemas.
RANGES: dict[str, tuple[float, float]] = {
    "rpo-threshold": (RPO_THRESHOLD_MIN_S, RPO_THRESHOLD_MAX_S),
    "retention": (RETENTION_MIN_S, RETENTION_MAX_S),
    "crash-frequency": (CRASH_INTERVAL_MIN_S, CRASH_INTERVAL_MAX_S),
    "app-frequency": (APP_INTERVAL_MIN_S, APP_INTERVAL_MAX_S),
}


def describe_range(low: float, high: float) -> str:
    """``"1h to 15d"``: how ranges read in help texts and error messages."""
    return f"{format_duration(low)} to {format_duration(high)}"


# Labels used in messages, keyed by dataclass field.
_LABELS = {
    "rpo_threshold_s": "RPO threshold",
    "retention_s": "retention",
    "crash_interval_s": "crash-consistent frequency",
    "app_interval_s": "app-consistent frequency",
}

# Keyword names accepted by create()/with_changes() -> dataclass field.
_KEYWORDS = {
    "rpo_threshold": "rpo_threshold_s",
    "retention": "retention_s",
    "crash_frequency": "crash_interval_s",
    "app_frequency": "app_interval_s",
}


def _check_range(field: str, value: float, low: float, high: float, extra: str = "") -> None:
    if not (low <= value <= high):
        raise OutOfRange(
            field=_LABELS[field],
            value=format_duration(value),
            allowed=describe_range(low, high) + extra,
        )


def validate_name(name: str, *, allow_failback_suffix: bool = True) -> str:
    """Return ``name`` if it is a valid policy name; InvalidInput saying why otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            f"policy name {name!r} is not valid: use 1 to {NAME_MAX_LEN} letters, digits, '-', '_' or '.'."
        )
    limit = NAME_MAX_LEN
    if allow_failback_suffix and name.endswith(FAILBACK_SUFFIX):
        limit += len(FAILBACK_SUFFIX)
    if len(name) > limit:
        raise OutOfRange(
            f"policy name {name!r} is too long ({len(name)} characters): allowed is 1 to "
            f"{NAME_MAX_LEN} characters."
        )
    return name


@dataclass(frozen=True)
class PolicySpec:
    """A replication policy's settings, always valid (see the module docstring)."""

    name: str
    rpo_threshold_s: float = DEFAULT_RPO_THRESHOLD_S
    retention_s: float = DEFAULT_RETENTION_S
    crash_interval_s: float = DEFAULT_CRASH_INTERVAL_S
    app_interval_s: float = DEFAULT_APP_INTERVAL_S
    """Seconds between app-consistent points; 0 turns app-consistent points off."""

    def __post_init__(self) -> None:
        validate_name(self.name)
        for field in _LABELS:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidInput(f"{_LABELS[field]} {value!r} is not a duration: give a number of seconds.")
            # Normalise ints (e.g. from a store) so equality and hashing behave.
            object.__setattr__(self, field, float(value))
        _check_range("rpo_threshold_s", self.rpo_threshold_s, RPO_THRESHOLD_MIN_S, RPO_THRESHOLD_MAX_S)
        _check_range("retention_s", self.retention_s, RETENTION_MIN_S, RETENTION_MAX_S)
        _check_range(
            "crash_interval_s",
            self.crash_interval_s,
            CRASH_INTERVAL_MIN_S,
            min(CRASH_INTERVAL_MAX_S, self.retention_s),
        )
        if self.app_interval_s != APP_INTERVAL_OFF:
            _check_range(
                "app_interval_s",
                self.app_interval_s,
                APP_INTERVAL_MIN_S,
                APP_INTERVAL_MAX_S,
                extra=", or 0 (off)",
            )
            if self.app_interval_s >= self.retention_s:
                raise OutOfRange(
                    field=_LABELS["app_interval_s"],
                    value=format_duration(self.app_interval_s),
                    allowed=(
                        f"less than the retention {format_duration(self.retention_s)}, or 0 (off); "
                        "lower the frequency or raise the retention"
                    ),
                )

    @classmethod
    def create(
        cls,
        name: str,
        *,
        rpo_threshold: str | float = DEFAULT_RPO_THRESHOLD_S,
        retention: str | float = DEFAULT_RETENTION_S,
        crash_frequency: str | float = DEFAULT_CRASH_INTERVAL_S,
        app_frequency: str | float = DEFAULT_APP_INTERVAL_S,
    ) -> PolicySpec:
        """A validated policy from durations given as strings (``"15m"``) or seconds."""
        return cls(
            name=name,
            rpo_threshold_s=parse_duration(rpo_threshold),
            retention_s=parse_duration(retention),
            crash_interval_s=parse_duration(crash_frequency),
            app_interval_s=parse_duration(app_frequency),
        )

    def with_changes(self, **changes: Any) -> PolicySpec:
        """A validated copy with some settings changed.

        Keywords are those of :meth:`create` (``retention="48h"``) or the field names
        (``retention_s=172800``), plus ``name``.
        """
        fields: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "name":
                fields["name"] = value
            elif key in _KEYWORDS:
                fields[_KEYWORDS[key]] = parse_duration(value)
            elif key in _LABELS:
                fields[key] = parse_duration(value)
            else:
                accepted = ", ".join(["name", *_KEYWORDS])
                raise InvalidInput(f"policy setting {key!r} is not known: known settings are {accepted}.")
        return dataclasses.replace(self, **fields)

    def failback_twin(self) -> PolicySpec:
        """The policy used for failback: ``<name>-failback`` with the same settings."""
        return dataclasses.replace(self, name=self.name + FAILBACK_SUFFIX)

    @property
    def app_consistent(self) -> bool:
        return self.app_interval_s != APP_INTERVAL_OFF

    def advice(self) -> tuple[str, ...]:
        """Sentences about valid but probably unintended settings, for the CLI to show."""
        notes: list[str] = []
        if self.rpo_threshold_s < self.crash_interval_s:
            notes.append(
                f"the RPO threshold {format_duration(self.rpo_threshold_s)} is below the "
                f"crash-consistent frequency {format_duration(self.crash_interval_s)}: the RPO "
                "grows to the frequency between points, so the item will report Critical health; "
                "raise the threshold or the frequency."
            )
        return tuple(notes)
