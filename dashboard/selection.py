"""What the reader picked in the sidebar, as a plain value (hashable, so loaders can cache on it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

__all__ = ["ALL_TAGS", "Selection"]

ALL_TAGS = ""  # the tag selectbox's "any tag" entry


@dataclass(frozen=True, slots=True)
class Selection:
    start: date  # first UTC day shown
    end: date  # last UTC day shown (inclusive, as a person reads a range)
    models: tuple[str, ...] = ()  # empty: every model
    statuses: tuple[str, ...] = ()  # empty: every status
    tag_key: str = ALL_TAGS
    tag_values: tuple[str, ...] = ()  # empty with a key: calls that carry the key, any value

    @property
    def since(self) -> datetime:
        """The range's first instant (inclusive)."""
        return datetime.combine(self.start, time(0), tzinfo=timezone.utc)

    @property
    def until(self) -> datetime:
        """The instant after the range (exclusive): midnight after ``end``."""
        return datetime.combine(self.end + timedelta(days=1), time(0), tzinfo=timezone.utc)

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1
