"""The values of traffic shaping, sans-IO: an egress path, a rate, the limits of a path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["DIRECT", "EgressPath", "PathLimits", "Rate", "parse_duration", "parse_rate"]

DIRECT: Final = "direct"  # the source of a bypass domain's path (delivered from this host)

_UNITS: Final = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]*)\s*(s|sec|m|min|h|d)\s*")
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|min|h|d)?\s*")


@dataclass(frozen=True, slots=True)
class EgressPath:
    """Where shaping counts: ``source`` is the address written as the PROXY header's source
    (``ha_proxy_src_addr`` or ``ha_proxy_ipv6_src_addr``, as text), or :data:`DIRECT`;
    ``site`` a named site's name, or the destination's MX host names normalised (sorted,
    lower case, no trailing dot, joined with ",")."""

    source: str
    site: str

    @property
    def key(self) -> str:
        """The path as one string, e.g. for a Redis key: ``"192.0.2.10|gmail"``."""
        return f"{self.source}|{self.site}"


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events per ``per`` seconds (``"100/min"`` is Rate(100, 60.0)). As a GCRA
    (generic cell rate algorithm) an event is admitted every ``per / count`` seconds, with a
    burst of ``count`` events."""

    count: int
    per: float

    @property
    def interval(self) -> float:
        """Seconds between two events at the steady rate."""
        return self.per / self.count

    def __str__(self) -> str:
        for unit, seconds in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
            if self.per == seconds:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.per:g}s"


@dataclass(frozen=True, slots=True)
class PathLimits:
    """The limits in force on one egress path (``None``: no limit of that kind).

    ``connection_limit``: concurrent upstream connections (idle cached ones count);
    ``max_connection_rate``: new upstream connections; ``max_message_rate``: transactions;
    ``max_deliveries_per_connection``: transactions on one connection before it is closed."""

    connection_limit: int | None = None
    max_connection_rate: Rate | None = None
    max_message_rate: Rate | None = None
    max_deliveries_per_connection: int | None = None


def parse_rate(text: str) -> Rate:
    """``"100/min"``, ``"20000/h"``, ``"5/s"``, ``"10/30s"`` -> :class:`Rate`; ValueError
    (with the reason) for anything else or a zero count."""
    match = _RATE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f'{text!r} is not a rate like "100/min" (units: s, min, h, d)')
    count, multiple, unit = int(match[1]), match[2], match[3]
    per = (int(multiple) if multiple else 1) * _UNITS[unit]
    if count <= 0 or per <= 0:
        raise ValueError(f"{text!r}: a rate needs a positive count and period")
    return Rate(count, per)


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``"90s"``, ``"2h"``, ``"1.5min"``, ``"30"`` or a number; ValueError for
    anything else or a value not above 0."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION_RE.fullmatch(str(text))
        if match is None:
            raise ValueError(f'{text!r} is not a duration like "90s", "30min" or "2h"')
        seconds = float(match[1]) * _UNITS.get(match[2] or "s", 1.0)
    if not seconds > 0:
        raise ValueError(f"{text!r}: a duration must be above 0")
    return seconds
