"""Docker's ``--since``/``--until`` values: a duration back from now (``10m``, ``1h30m``, ``45s``, ``2d``), Unix
seconds (``1733050000``, ``1733050000.5``), or an ISO-8601/RFC 3339 time (``2026-12-01T10:00:00Z``; without a zone
it is local time, as Docker reads it; a date alone is its midnight). Pure: ``now`` is an argument."""

from __future__ import annotations

import re
from datetime import datetime

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h|d))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


class BadTime(ValueError):
    """The text is none of the accepted forms; the message lists them."""


def parse_time(text: str, now: float) -> float:
    """Unix seconds for ``text`` (see the module). Raises BadTime."""
    value = text.strip()
    if _DURATION.fullmatch(value):
        return now - sum(float(n) * _UNITS[u] for n, u in _PART.findall(value))
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadTime(
            f"{text!r} is not a time: use a duration (10m, 1h30m), Unix seconds, or an ISO-8601 time "
            "such as 2026-12-01T10:00:00Z"
        ) from None
    return moment.timestamp()  # a naive datetime is local time


def parse_range(since: str | None, until: str | None, now: float) -> tuple[float | None, float | None]:
    """``--since``/``--until`` as Unix seconds, None where not given; both read against the same ``now``. Raises
    BadTime."""
    return (parse_time(since, now) if since else None, parse_time(until, now) if until else None)
