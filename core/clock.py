"""The one way Conveyor writes a time as text: ISO 8601, by `iso`.

Records in Redis keep times as epoch seconds (cheap to compare and to write from Lua); what
people and JSON read is ISO 8601, in UTC when the time came as epoch seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def iso(moment: None, *, timespec: str = "milliseconds") -> None: ...
@overload
def iso(moment: datetime | float | str, *, timespec: str = "milliseconds") -> str: ...
def iso(moment: datetime | float | str | None, *, timespec: str = "milliseconds") -> str | None:
    """`moment` (a datetime, or epoch seconds as a number or its text) in ISO 8601, to the
    `timespec` datetime.isoformat takes; None stays None."""
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(float(moment), UTC)
    return moment.isoformat(timespec=timespec)
