"""The price book: tariffs as data (a TOML file), loaded, validated and looked up.

A book holds, per model, effective-dated ``[[tariff]]`` entries ``[from, to)``, each with
prices per time-of-use period and currency (``prices.<period>.<currency> = {hit, miss,
output}``, per ``per_tokens`` tokens); ``[[alias]]`` entries that bill a name as another
model for a while; time-of-use ``[schedule.NAME]`` and holiday ``[calendar.NAME]`` tables
(``collector.timeofuse``). Every entry names its ``source``. A promotion entry carries its
``list`` prices beside the promoted ones, so an estimate can ask for either.

Which book is used: ``--prices FILE`` on a command, else ``DSMETER_PRICES``, else the book
shipped with dsmeter (``collector/prices.toml``). A team's file *replaces* the shipped book,
unless it says ``[book] extends = "dsmeter"``: then it is layered over the shipped book. Its
entries win wherever they apply (per model, time and currency) and everything they do not
cover comes from the shipped book; a schedule or calendar of the same name replaces the
shipped one everywhere (e.g. a corrected holiday calendar).

Validation collects every problem, each with its file, line and entry: TOML syntax,
unknown keys, overlapping periods for one model and currency, ``to`` not after ``from``,
a window that does not parse or overlaps another, an unknown time zone, a missing or
negative price, more decimals than the ledger keeps (10^-12 per token), an alias loop or
an alias to a model the book does not know.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from collector.errors import UsageError
from collector.timeofuse import (
    WEEKDAYS,
    WORKDAYS,
    Calendar,
    Schedule,
    Window,
    format_clock,
    overlapping_windows,
    parse_clock,
)

__all__ = [
    "ENV_PRICES",
    "SHIPPED",
    "STANDARD",
    "PRICE_AT_CHOICES",
    "LEDGER_DECIMALS",
    "Location",
    "Problem",
    "PriceBookError",
    "Rates",
    "Tariff",
    "Alias",
    "Resolution",
    "PriceBook",
    "load_book",
    "shipped_book",
    "parse_book",
    "check_book",
    "book_path_from_env",
]

ENV_PRICES = "DSMETER_PRICES"
SHIPPED = "dsmeter"  # `[book] extends = "dsmeter"`: layer this file over the shipped book
STANDARD = "standard"  # the one period of a tariff without a schedule
PRICE_AT_CHOICES = ("started_at", "finished_at")
LEDGER_DECIMALS = 12  # the ledger keeps money to 10^-12 (collector.models.MONEY_SCALE)
_SHIPPED_FILE = "prices.toml"
_CURRENCY = re.compile(r"[A-Z]{3}")
_ID_FORBIDDEN = re.compile(r"[\s/#>]")  # tariff ids are joined with these in a row's tariff_id
_RESOLVED_MAX = 100_000  # remembered look-ups per book (model names x intervals); past it, look up afresh


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int | None = None

    def __str__(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a book, and where."""

    location: Location
    where: str  # the entry: "tariff #3 (deepseek-chat@2024-08-02)", "schedule utc-nightly-2025"
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.where}: {self.message}" if self.where else f"{self.location}: {self.message}"


class PriceBookError(UsageError):
    """A book that cannot be used; ``problems`` lists everything wrong with it."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        first = str(self.problems[0]) if self.problems else "invalid price book"
        more = len(self.problems) - 1
        if more:
            first += f" (and {more} more; `dsmeter prices check FILE` lists them all)"
        super().__init__(first)


@dataclass(frozen=True, slots=True)
class Rates:
    """Prices per ``per_tokens`` tokens: cache-hit input, cache-miss input, output (reasoning included)."""

    hit: Decimal
    miss: Decimal
    output: Decimal


PriceTable = Mapping[str, Mapping[str, Rates]]  # period -> currency -> rates


@dataclass(frozen=True, slots=True)
class Tariff:
    """One model's prices for one effective period ``[start, end)`` (``end`` None: still in force)."""

    id: str
    model: str
    start: datetime
    end: datetime | None
    prices: PriceTable
    list_prices: PriceTable | None = None  # only on a promotion
    schedule: Schedule | None = None
    promotion: str | None = None
    source: str = ""
    note: str | None = None
    per_tokens: int = 1_000_000
    location: Location = Location("<memory>")
    layer: int = 0  # 0: the book given; 1: the shipped book under a book that extends it

    def covers(self, at: datetime) -> bool:
        return self.start <= at and (self.end is None or at < self.end)

    @property
    def periods(self) -> tuple[str, ...]:
        return self.schedule.periods if self.schedule is not None else (STANDARD,)

    @property
    def currencies(self) -> tuple[str, ...]:
        return tuple(sorted({currency for table in self.prices.values() for currency in table}))

    def period_at(self, at: datetime) -> str:
        return self.schedule.period_at(at) if self.schedule is not None else STANDARD

    def rates(self, period: str, currency: str, *, list_prices: bool = False) -> Rates | None:
        table = self.list_prices if list_prices and self.list_prices is not None else self.prices
        return table.get(period, {}).get(currency)


@dataclass(frozen=True, slots=True)
class Alias:
    """``name`` is billed as ``model`` during ``[start, end)``."""

    name: str
    model: str
    start: datetime
    end: datetime | None
    source: str = ""
    note: str | None = None
    location: Location = Location("<memory>")
    layer: int = 0

    def covers(self, at: datetime) -> bool:
        return self.start <= at and (self.end is None or at < self.end)

    def overlaps(self, start: datetime, end: datetime | None) -> bool:
        return _overlap(self.start, self.end, start, end)


@dataclass(frozen=True, slots=True)
class Resolution:
    """How a name was priced at an instant: the aliases followed, then the tariff."""

    name: str
    tariff: Tariff
    aliases: tuple[Alias, ...] = ()

    @property
    def via(self) -> str | None:
        """The name asked for when it reached the tariff through aliases, else None."""
        return self.name if self.aliases else None


@dataclass(frozen=True)
class PriceBook:
    """A loaded, valid price book. Look names up with ``resolve``; it never changes once built."""

    name: str
    currency: str
    price_at: str
    tariffs: tuple[Tariff, ...]
    aliases: tuple[Alias, ...]
    schedules: Mapping[str, Schedule]
    calendars: Mapping[str, Calendar]
    origin: str  # where it came from, with a digest: what an audit entry records
    digest: str
    files: tuple[str, ...] = ()
    _tariffs_by_model: dict[tuple[int, str], list[Tariff]] = field(default_factory=dict, repr=False, compare=False)
    _aliases_by_name: dict[tuple[int, str], list[Alias]] = field(default_factory=dict, repr=False, compare=False)
    _layers: tuple[int, ...] = field(default=(), repr=False, compare=False)
    _boundaries: list[datetime] = field(default_factory=list, repr=False, compare=False)
    _resolved: dict[tuple[str, int, str], Resolution | None] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for tariff in self.tariffs:
            self._tariffs_by_model.setdefault((tariff.layer, tariff.model), []).append(tariff)
        for alias in self.aliases:
            self._aliases_by_name.setdefault((alias.layer, alias.name), []).append(alias)
        layers = sorted({t.layer for t in self.tariffs} | {a.layer for a in self.aliases})
        object.__setattr__(self, "_layers", tuple(layers))
        # Every instant where some entry starts or ends: between two of them, every look-up
        # gives the same answer, so ``resolve`` remembers answers per (name, interval).
        edges = {t.start for t in self.tariffs} | {t.end for t in self.tariffs if t.end is not None}
        edges |= {a.start for a in self.aliases} | {a.end for a in self.aliases if a.end is not None}
        self._boundaries.extend(sorted(edges))

    # -- look-ups -------------------------------------------------------------------------

    def resolve(self, name: str, at: datetime, currency: str | None = None) -> Resolution | None:
        """The tariff that prices ``name`` at ``at`` (in ``currency``, default the book's), or None.

        Aliases in force at ``at`` are followed (a higher layer's entries first). None means
        the book has no price for that name, time and currency: the call is unpriced.
        """
        if at.tzinfo is None:
            raise ValueError(f"naive datetime {at!r}: prices are looked up by aware UTC instants")
        wanted = currency or self.currency
        key = (name, bisect.bisect_right(self._boundaries, at), wanted)
        try:
            return self._resolved[key]
        except KeyError:
            found = self._resolve(name, at, wanted)
            if len(self._resolved) < _RESOLVED_MAX:
                self._resolved[key] = found
            return found

    def _resolve(self, name: str, at: datetime, wanted: str) -> Resolution | None:
        followed: list[Alias] = []
        current = name
        for _ in range(len(self.aliases) + 1):
            alias, tariff = self._lookup(current, at, wanted)
            if tariff is not None:
                return Resolution(name=name, tariff=tariff, aliases=tuple(followed))
            if alias is None or any(a is alias for a in followed):
                return None
            followed.append(alias)
            current = alias.model
        return None  # pragma: no cover - validation rejects alias loops

    def _lookup(self, name: str, at: datetime, currency: str) -> tuple[Alias | None, Tariff | None]:
        for layer in self._layers:
            for alias in self._aliases_by_name.get((layer, name), ()):
                if alias.covers(at):
                    return alias, None
            in_force = [t for t in self._tariffs_by_model.get((layer, name), ()) if t.covers(at)]
            for tariff in in_force:
                if currency in tariff.currencies:
                    return None, tariff
        return None, None

    def tariffs_of(self, model: str) -> list[Tariff]:
        """Every entry for ``model`` (all layers), oldest first."""
        return sorted((t for t in self.tariffs if t.model == model), key=lambda t: (t.start, t.layer))

    def aliases_at(self, at: datetime) -> list[Alias]:
        """Aliases in force at ``at`` (one per name: the highest layer's)."""
        seen: dict[str, Alias] = {}
        for alias in sorted(self.aliases, key=lambda a: a.layer):
            if alias.covers(at) and alias.name not in seen:
                seen[alias.name] = alias
        return sorted(seen.values(), key=lambda a: a.name)

    def models_at(self, at: datetime, currency: str | None = None) -> list[str]:
        """Models with a tariff of their own in force at ``at`` (not through an alias), sorted."""
        names = sorted({t.model for t in self.tariffs if t.covers(at)})
        out = []
        for model in names:
            found = self.resolve(model, at, currency)
            if found is not None and not found.aliases:
                out.append(model)
        return out

    def knows(self, name: str) -> bool:
        """Whether the book has any entry (tariff or alias) for ``name``, at any time."""
        return any(key[1] == name for key in self._tariffs_by_model) or any(
            key[1] == name for key in self._aliases_by_name
        )

    @property
    def currencies(self) -> tuple[str, ...]:
        """Every currency some tariff of the book is priced in."""
        return tuple(sorted({c for t in self.tariffs for c in t.currencies}))

    @property
    def first_start(self) -> datetime | None:
        return min((t.start for t in self.tariffs), default=None)


# =============================================================================================
# Loading
# =============================================================================================


def book_path_from_env() -> str | None:
    value = os.environ.get(ENV_PRICES, "").strip()
    return value or None


def load_book(path: str | os.PathLike[str] | None = None) -> PriceBook:
    """The book to price with: ``path``, else ``$DSMETER_PRICES``, else the shipped book.

    Raises ``PriceBookError`` (a ``UsageError``: exit code 2) naming every problem.
    """
    chosen = os.fspath(path) if path is not None else book_path_from_env()
    if chosen is None:
        return shipped_book()
    return _load_file(chosen)


@functools.lru_cache(maxsize=1)
def shipped_book() -> PriceBook:
    """The book dsmeter ships (``collector/prices.toml``), parsed once per process."""
    text = _shipped_text()
    return _build([_parse_source(text, f"collector/{_SHIPPED_FILE}", shipped=True)], origin="dsmeter shipped book")


def parse_book(text: str, *, filename: str = "<prices>") -> PriceBook:
    """A book from TOML text (layered over the shipped book if it says ``extends``)."""
    source = _parse_source(text, filename, shipped=False)
    return _assemble(source, origin=filename)


def check_book(path: str | os.PathLike[str] | None = None) -> tuple[PriceBook | None, list[Problem]]:
    """Validate a book without raising: (the book or None, every problem found)."""
    try:
        return load_book(path), []
    except PriceBookError as error:
        return None, list(error.problems)


def _shipped_text() -> str:
    return resources.files("collector").joinpath(_SHIPPED_FILE).read_text(encoding="utf-8")


def _load_file(path: str) -> PriceBook:
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as error:
        raise PriceBookError([Problem(Location(path), "", f"cannot read the price book: {error.strerror or error}")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PriceBookError([Problem(Location(path), "", f"not UTF-8 text (byte {error.start})")]) from None
    source = _parse_source(text, path, shipped=False)
    return _assemble(source, origin=path)


def _assemble(source: _Source, *, origin: str) -> PriceBook:
    if source.extends:
        base = _parse_source(_shipped_text(), f"collector/{_SHIPPED_FILE}", shipped=True)
        return _build([source, base], origin=f"{origin} over the dsmeter shipped book")
    return _build([source], origin=origin)


# =============================================================================================
# Parsing: one file -> raw, located sections; problems collected, never raised one by one
# =============================================================================================


class _Locator:
    """Line numbers of a TOML file's tables and keys, for error messages (tomllib keeps none)."""

    _HEADER = re.compile(r"^\s*\[(\[)?\s*([^\]]+?)\s*\]")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str, bool]] = []  # (line number, dotted name, is array table)
        for number, line in enumerate(self.lines, start=1):
            match = self._HEADER.match(line)
            if match:
                self.headers.append((number, re.sub(r"\s*\.\s*", ".", match.group(2)).replace('"', ""), bool(match.group(1))))

    def array_item(self, name: str, index: int) -> int | None:
        found = [number for number, header, array in self.headers if array and header == name]
        return found[index] if index < len(found) else None

    def table(self, name: str) -> int | None:
        for number, header, array in self.headers:
            if not array and header == name:
                return number
        return None

    def key(self, block_line: int | None, key: str, nth: int = 0) -> int | None:
        """The line of the ``nth`` ``key`` (dotted) inside the table starting at ``block_line``."""
        if block_line is None:
            return None
        end = next((n for n, _, _ in self.headers if n > block_line), len(self.lines) + 1)
        parts = [re.escape(p) for p in key.split(".")]
        pattern = re.compile(r"(^|[{,]\s*)\s*" + r"\s*\.\s*".join(parts) + r"\s*[=.]")
        seen = 0
        for number in range(block_line + 1, end):
            if pattern.search(self.lines[number - 1]):
                if seen == nth:
                    return number
                seen += 1
        return block_line


@dataclass
class _Source:
    file: str
    shipped: bool
    locator: _Locator
    digest: str
    settings: dict[str, Any] = field(default_factory=dict)
    extends: bool = False
    tariffs: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    aliases: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)
    calendars: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def at(self, line: int | None) -> Location:
        return Location(self.file, line)

    def problem(self, line: int | None, where: str, message: str) -> None:
        self.problems.append(Problem(self.at(line), where, message))


_TOP_KEYS = {"book", "tariff", "alias", "schedule", "calendar"}
_BOOK_KEYS = {"name", "currency", "per_tokens", "price_at", "extends", "source", "note"}
_TARIFF_KEYS = {"id", "model", "from", "to", "schedule", "prices", "list", "promotion", "source", "note"}
_ALIAS_KEYS = {"name", "model", "from", "to", "source", "note"}
_SCHEDULE_KEYS = {"time_zone", "default", "windows", "holidays", "peak", "off_peak", "source", "note"}
_WINDOW_KEYS = {"period", "from", "to", "days"}
_CALENDAR_KEYS = {"holidays", "working_days", "years", "source", "note"}
_RATE_KEYS = ("hit", "miss", "output")


def _parse_source(text: str, file: str, *, shipped: bool) -> _Source:
    source = _Source(file=file, shipped=shipped, locator=_Locator(text),
                     digest=hashlib.sha256(text.encode("utf-8")).hexdigest())
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as error:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(error))
        line = int(match.group(1)) if match else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(error))
        source.problem(line, "", f"not valid TOML: {message}" + (f" (column {match.group(2)})" if match else ""))
        return source
    for key in data:
        if key not in _TOP_KEYS:
            source.problem(None, "", f"unknown section {key!r} (expected {', '.join(sorted(_TOP_KEYS))})")

    book = data.get("book", {})
    book_line = source.locator.table("book")
    if not isinstance(book, dict):
        source.problem(book_line, "[book]", "must be a table")
        book = {}
    _unknown_keys(source, book, _BOOK_KEYS, book_line, "[book]")
    source.settings = book
    extends = book.get("extends")
    if extends is not None:
        if extends != SHIPPED:
            source.problem(source.locator.key(book_line, "extends"), "[book]",
                           f"extends must be {SHIPPED!r} (the shipped book), got {extends!r}")
        elif shipped:
            source.problem(book_line, "[book]", "the shipped book cannot extend itself")
        else:
            source.extends = True

    for kind, target in (("tariff", source.tariffs), ("alias", source.aliases)):
        items = data.get(kind, [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            source.problem(source.locator.array_item(kind, 0), f"[[{kind}]]",
                           f"{kind} entries must be [[{kind}]] tables")
            continue
        target.extend(enumerate(items))

    for kind, named in (("schedule", source.schedules), ("calendar", source.calendars)):
        tables = data.get(kind, {})
        if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
            source.problem(None, f"[{kind}]", f"each {kind} must be a [{kind}.NAME] table")
            continue
        named.update(tables)
    return source


def _unknown_keys(source: _Source, table: Mapping[str, Any], allowed: set[str], line: int | None, where: str) -> None:
    for key in table:
        if key not in allowed:
            source.problem(source.locator.key(line, key) if line else line, where,
                           f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")


# =============================================================================================
# Building: raw sections -> validated objects
# =============================================================================================


def _build(sources: list[_Source], *, origin: str) -> PriceBook:
    """Sources top layer first. Schedules and calendars share one namespace (top wins)."""
    problems: list[Problem] = []
    for source in sources:
        problems.extend(source.problems)
    if problems:
        raise PriceBookError(problems)

    top = sources[0]
    settings = _book_settings(top)

    calendars: dict[str, Calendar] = {}
    for source in reversed(sources):  # lower layers first, so the top layer's names replace theirs
        for name, raw in source.calendars.items():
            built = _build_calendar(source, name, raw)
            if built is not None:
                calendars[name] = built
    schedules: dict[str, Schedule] = {}
    for source in reversed(sources):
        for name, raw in source.schedules.items():
            built_schedule = _build_schedule(source, name, raw, calendars)
            if built_schedule is not None:
                schedules[name] = built_schedule

    tariffs: list[Tariff] = []
    aliases: list[Alias] = []
    for layer, source in enumerate(sources):
        per_tokens = _per_tokens(source)
        layer_tariffs = [
            t for t in (
                _build_tariff(source, index, raw, schedules, per_tokens, layer) for index, raw in source.tariffs
            ) if t is not None
        ]
        layer_aliases = [
            a for a in (_build_alias(source, index, raw, layer) for index, raw in source.aliases) if a is not None
        ]
        _check_tariff_overlaps(source, layer_tariffs)
        _check_alias_overlaps(source, layer_aliases, layer_tariffs)
        tariffs.extend(layer_tariffs)
        aliases.extend(layer_aliases)

    known = {t.model for t in tariffs} | {a.name for a in aliases}
    for alias in aliases:
        source = sources[alias.layer]
        if alias.model not in known:
            source.problem(alias.location.line, _alias_where(alias),
                           f"alias to unknown model {alias.model!r}: no tariff or alias in the book names it")
    _check_alias_loops(sources, aliases)

    problems = [p for source in sources for p in source.problems]
    if problems:
        raise PriceBookError(problems)
    digest = hashlib.sha256("".join(s.digest for s in sources).encode()).hexdigest()
    return PriceBook(
        name=settings["name"],
        currency=settings["currency"],
        price_at=settings["price_at"],
        tariffs=tuple(tariffs),
        aliases=tuple(aliases),
        schedules=schedules,
        calendars=calendars,
        origin=f"{origin} (sha256 {digest[:12]})",
        digest=digest,
        files=tuple(s.file for s in sources),
    )


def _book_settings(source: _Source) -> dict[str, Any]:
    book = source.settings
    line = source.locator.table("book")
    out: dict[str, Any] = {"name": "price book", "currency": "USD", "price_at": "started_at"}
    name = book.get("name", Path(source.file).name)
    if not isinstance(name, str):
        source.problem(source.locator.key(line, "name"), "[book]", "name must be text")
    else:
        out["name"] = name
    currency = book.get("currency", "USD")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        source.problem(source.locator.key(line, "currency"), "[book]",
                       f"currency must be a 3-letter ISO code such as \"USD\" or \"CNY\", got {currency!r}")
    else:
        out["currency"] = currency
    price_at = book.get("price_at", "started_at")
    if price_at not in PRICE_AT_CHOICES:
        source.problem(source.locator.key(line, "price_at"), "[book]",
                       f"price_at must be one of {', '.join(PRICE_AT_CHOICES)}, got {price_at!r}")
    else:
        out["price_at"] = price_at
    for key in ("source", "note"):
        if key in book and not isinstance(book[key], str):
            source.problem(source.locator.key(line, key), "[book]", f"{key} must be text")
    return out


def _per_tokens(source: _Source) -> int:
    value = source.settings.get("per_tokens", 1_000_000)
    line = source.locator.key(source.locator.table("book"), "per_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or not _is_power_of_ten(value):
        source.problem(line, "[book]", f"per_tokens must be a power of ten such as 1_000_000, got {value!r}")
        return 1_000_000
    return value


def _is_power_of_ten(value: int) -> bool:
    while value % 10 == 0:
        value //= 10
    return value == 1


def _build_calendar(source: _Source, name: str, raw: dict[str, Any]) -> Calendar | None:
    line = source.locator.table(f"calendar.{name}")
    where = f"calendar {name}"
    before = len(source.problems)
    _unknown_keys(source, raw, _CALENDAR_KEYS, line, where)
    text = _text(source, raw, "source", line, where, required=True)
    note = _text(source, raw, "note", line, where, required=False)
    years_raw = raw.get("years", [])
    years: tuple[int, ...] = ()
    if not isinstance(years_raw, list) or not all(isinstance(y, int) and not isinstance(y, bool) for y in years_raw):
        source.problem(source.locator.key(line, "years"), where, "years must be a list of years such as [2026, 2027]")
    else:
        years = tuple(years_raw)
    days: dict[str, frozenset[date]] = {}
    for key in ("holidays", "working_days"):
        value = raw.get(key, [])
        bad = [v for v in value if not _is_date(v)] if isinstance(value, list) else [value]
        if bad:
            source.problem(source.locator.key(line, key), where,
                           f"{key} must be a list of dates such as 2026-10-01 (without quotes), got {bad[0]!r}")
            days[key] = frozenset()
            continue
        days[key] = frozenset(value)
        if years:
            outside = sorted(d for d in value if d.year not in years)
            if outside:
                source.problem(source.locator.key(line, key), where,
                               f"{outside[0]} is outside the calendar's years {list(years)}")
    both = sorted(days.get("holidays", frozenset()) & days.get("working_days", frozenset()))
    if both:
        source.problem(source.locator.key(line, "working_days"), where,
                       f"{both[0]} is both a holiday and a working day")
    if "holidays" not in raw:
        source.problem(line, where, "missing holidays (a list of dates)")
    if len(source.problems) > before:
        return None
    return Calendar(name=name, holidays=days["holidays"], working_days=days["working_days"], years=years,
                    source=text or "", note=note)


def _build_schedule(source: _Source, name: str, raw: dict[str, Any], calendars: Mapping[str, Calendar]) -> Schedule | None:
    line = source.locator.table(f"schedule.{name}")
    where = f"schedule {name}"
    before = len(source.problems)
    _unknown_keys(source, raw, _SCHEDULE_KEYS, line, where)
    text = _text(source, raw, "source", line, where, required=True)
    note = _text(source, raw, "note", line, where, required=False)
    zone = raw.get("time_zone")
    if not isinstance(zone, str) or not zone:
        source.problem(source.locator.key(line, "time_zone"), where, "missing time_zone (an IANA name such as \"Asia/Shanghai\")")
        zone = None
    else:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            source.problem(source.locator.key(line, "time_zone"), where, f"unknown time zone {zone!r}")
            zone = None
    default = raw.get("default")
    if not isinstance(default, str) or not default:
        source.problem(source.locator.key(line, "default"), where, "missing default (the period outside every window)")
        default = None
    calendar: Calendar | None = None
    holidays = raw.get("holidays")
    if holidays is not None:
        if not isinstance(holidays, str) or holidays not in calendars:
            known = ", ".join(sorted(calendars)) or "none"
            source.problem(source.locator.key(line, "holidays"), where,
                           f"holidays names an unknown calendar {holidays!r} (known: {known})")
        else:
            calendar = calendars[holidays]
    windows_raw = raw.get("windows")
    windows: list[Window] = []
    if not isinstance(windows_raw, list) or not windows_raw:
        source.problem(source.locator.key(line, "windows"), where,
                       "missing windows: a list such as [{ period = \"peak\", from = \"09:00\", to = \"12:00\" }]")
        windows_raw = []
    for index, window_raw in enumerate(windows_raw):
        window_line = source.locator.key(line, "period", nth=index)
        window_where = f"{where} window #{index + 1}"
        window = _build_window(source, window_raw, window_line, window_where, has_calendar=calendar is not None)
        if window is not None:
            windows.append(window)
    if len(source.problems) > before or zone is None or default is None:
        return None
    periods = {default, *(w.period for w in windows)}
    designated: dict[str, str] = {}
    for key, fallback in (("peak", "peak"), ("off_peak", "off-peak")):
        value = raw.get(key)
        if value is None:
            designated[key] = fallback if fallback in periods else default
        elif not isinstance(value, str) or value not in periods:
            source.problem(source.locator.key(line, key), where,
                           f"{key} must name one of the schedule's periods ({', '.join(sorted(periods))}), got {value!r}")
        else:
            designated[key] = value
    schedule = Schedule(name=name, time_zone=zone, default=default, windows=tuple(windows), calendar=calendar,
                        peak=designated.get("peak", default), off_peak=designated.get("off_peak", default),
                        source=text or "", note=note)
    for first, second, minute in overlapping_windows(schedule):
        index = schedule.windows.index(second)
        source.problem(source.locator.key(line, "period", nth=index), f"{where} window #{index + 1}",
                       f"{second.describe()} overlaps {first.describe()} (both claim {minute})")
    if len(source.problems) > before:
        return None
    return schedule


def _build_window(source: _Source, raw: Any, line: int | None, where: str, *, has_calendar: bool) -> Window | None:
    if not isinstance(raw, dict):
        source.problem(line, where, "a window must be a table { period = ..., from = \"HH:MM\", to = \"HH:MM\" }")
        return None
    before = len(source.problems)
    _unknown_keys(source, raw, _WINDOW_KEYS, None, where)
    period = raw.get("period")
    if not isinstance(period, str) or not period:
        source.problem(line, where, "missing period (the name of the prices that apply in this window)")
    bounds: list[int] = []
    for key in ("from", "to"):
        value = raw.get(key)
        if not isinstance(value, str):
            source.problem(line, where, f"window {key} must be a time of day in quotes, such as \"09:00\", got {value!r}")
            continue
        try:
            bounds.append(parse_clock(value, allow_24=key == "to"))
        except ValueError as error:
            source.problem(line, where, f"window {key} does not parse: {error}")
    days: frozenset[int] | str | None = None
    days_raw = raw.get("days")
    if days_raw is not None:
        if days_raw == WORKDAYS:
            if not has_calendar:
                source.problem(line, where, 'days = "workdays" needs the schedule to name a holidays calendar')
            days = WORKDAYS
        elif isinstance(days_raw, list) and days_raw and all(isinstance(d, str) and d.lower() in WEEKDAYS for d in days_raw):
            days = frozenset(WEEKDAYS.index(d.lower()) for d in days_raw)
        else:
            source.problem(line, where, f"days must be a list of {', '.join(WEEKDAYS)} or \"{WORKDAYS}\", got {days_raw!r}")
    if len(bounds) == 2 and bounds[0] == bounds[1] % (24 * 60):
        source.problem(line, where, f"window {format_clock(bounds[0])}-{format_clock(bounds[1])} is empty")
    if len(source.problems) > before:
        return None
    assert isinstance(period, str)
    return Window(period=period, start=bounds[0], end=bounds[1], days=days)


def _build_tariff(source: _Source, index: int, raw: dict[str, Any], schedules: Mapping[str, Schedule],
                  per_tokens: int, layer: int) -> Tariff | None:
    line = source.locator.array_item("tariff", index)
    model = raw.get("model")
    label = raw.get("id") or model or "?"
    raw_from = raw.get("from")
    if not raw.get("id") and isinstance(model, str) and isinstance(raw_from, datetime) and raw_from.tzinfo:
        label = f"{model}@{raw_from.astimezone(timezone.utc):%Y-%m-%d}"
    where = f"tariff #{index + 1} ({label})"
    before = len(source.problems)
    _unknown_keys(source, raw, _TARIFF_KEYS, line, where)
    if not isinstance(model, str) or not model.strip():
        source.problem(line, where, "missing model (the model name this entry prices)")
    start, end = _period(source, raw, line, where)
    text = _text(source, raw, "source", line, where, required=True)
    note = _text(source, raw, "note", line, where, required=False)
    promotion = _text(source, raw, "promotion", line, where, required=False)

    schedule: Schedule | None = None
    schedule_name = raw.get("schedule")
    if schedule_name is not None:
        if not isinstance(schedule_name, str) or schedule_name not in schedules:
            known = ", ".join(sorted(schedules)) or "none"
            source.problem(source.locator.key(line, "schedule"), where,
                           f"unknown schedule {schedule_name!r} (known: {known})")
            return None
        schedule = schedules[schedule_name]
    periods = schedule.periods if schedule is not None else (STANDARD,)

    tariff_id = raw.get("id")
    if tariff_id is None and isinstance(model, str) and start is not None:
        tariff_id = f"{model}@{start.astimezone(timezone.utc):%Y-%m-%d}"
    if tariff_id is not None and (not isinstance(tariff_id, str) or not tariff_id or _ID_FORBIDDEN.search(tariff_id)):
        source.problem(source.locator.key(line, "id"), where,
                       f"id must be text without spaces, '/', '#' or '>', got {tariff_id!r}")

    prices = _price_table(source, raw.get("prices"), "prices", periods, per_tokens, line, where, required=True)
    list_prices = None
    if "list" in raw:
        list_prices = _price_table(source, raw.get("list"), "list", periods, per_tokens, line, where, required=True)
        if promotion is None:
            source.problem(source.locator.key(line, "list"), where,
                           "list prices belong to a promotion: say what it is with promotion = \"...\"")
        elif prices is not None and list_prices is not None:
            for period in periods:
                missing = sorted(set(prices.get(period, {})) - set(list_prices.get(period, {})))
                if missing:
                    source.problem(source.locator.key(line, "list"), where,
                                   f"missing list price for period {period!r} in {missing[0]}")
    elif promotion is not None:
        source.problem(source.locator.key(line, "promotion"), where,
                       "a promotion must give its list prices beside it (list.<period>.<currency> = {...})")
    if len(source.problems) > before or prices is None or start is None:
        return None
    assert isinstance(model, str) and isinstance(tariff_id, str)
    return Tariff(id=tariff_id, model=model, start=start, end=end, prices=prices, list_prices=list_prices,
                  schedule=schedule, promotion=promotion, source=text or "", note=note, per_tokens=per_tokens,
                  location=source.at(line), layer=layer)


def _price_table(source: _Source, raw: Any, key: str, periods: Sequence[str], per_tokens: int,
                 line: int | None, where: str, *, required: bool) -> dict[str, dict[str, Rates]] | None:
    if raw is None:
        if required:
            example = f"{key}.{periods[0]}.USD = {{ hit = 0.028, miss = 0.14, output = 0.28 }}"
            source.problem(line, where, f"missing {key}: give one line per period and currency, e.g. {example}")
        return None
    if not isinstance(raw, dict):
        source.problem(source.locator.key(line, key), where, f"{key} must be a table of periods")
        return None
    table: dict[str, dict[str, Rates]] = {}
    ok = True
    for period in raw:
        if period not in periods:
            ok = False
            source.problem(source.locator.key(line, f"{key}.{period}"), where,
                           f"{key}: period {period!r} is not one of this entry's periods ({', '.join(periods)})")
    for period in periods:
        by_currency = raw.get(period)
        if by_currency is None:
            ok = False
            source.problem(line, where, f"missing {key} for period {period!r}")
            continue
        if not isinstance(by_currency, dict) or not by_currency:
            ok = False
            source.problem(source.locator.key(line, f"{key}.{period}"), where,
                           f"{key}.{period} must be a table of currencies, e.g. USD = {{ hit = ..., miss = ..., output = ... }}")
            continue
        table[period] = {}
        for currency, rates_raw in by_currency.items():
            key_line = source.locator.key(line, f"{key}.{period}.{currency}")
            label = f"{key}.{period}.{currency}"
            if not _CURRENCY.fullmatch(currency):
                ok = False
                source.problem(key_line, where, f"{label}: currency must be a 3-letter ISO code such as USD")
                continue
            rates = _rates(source, rates_raw, per_tokens, key_line, where, label)
            if rates is None:
                ok = False
            else:
                table[period][currency] = rates
    if ok:
        currencies = {period: set(table[period]) for period in periods}
        every = set().union(*currencies.values()) if currencies else set()
        for period in periods:
            for currency in sorted(every - currencies[period]):
                ok = False
                source.problem(line, where, f"missing {key} for period {period!r} in {currency} "
                                            f"(another period of this entry has a {currency} price)")
    return table if ok else None


def _rates(source: _Source, raw: Any, per_tokens: int, line: int | None, where: str, label: str) -> Rates | None:
    if not isinstance(raw, dict):
        source.problem(line, where, f"{label} must be {{ hit = ..., miss = ..., output = ... }}")
        return None
    ok = True
    for key in raw:
        if key not in _RATE_KEYS:
            ok = False
            source.problem(line, where, f"{label}: unknown price {key!r} (prices are hit, miss, output)")
    values: dict[str, Decimal] = {}
    max_places = LEDGER_DECIMALS - (len(str(per_tokens)) - 1)
    for key in _RATE_KEYS:
        if key not in raw:
            ok = False
            source.problem(line, where, f"{label}: missing price {key!r}")
            continue
        value = _decimal(raw[key])
        if value is None:
            ok = False
            source.problem(line, where, f"{label}: price {key} must be a number, got {raw[key]!r}")
            continue
        if value < 0:
            ok = False
            source.problem(line, where, f"{label}: price {key} is negative ({value:f})")
            continue
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)
        if -exponent > max_places and value != value.quantize(Decimal(1).scaleb(-max_places)):
            ok = False
            source.problem(line, where, f"{label}: price {key} {value:f} has more than {max_places} decimal places "
                                        f"per {per_tokens:,} tokens (the ledger keeps {LEDGER_DECIMALS} places)")
            continue
        values[key] = value
    if not ok:
        return None
    return Rates(hit=values["hit"], miss=values["miss"], output=values["output"])


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        try:
            parsed = Decimal(value.strip())
        except InvalidOperation:
            return None
        return parsed if parsed.is_finite() else None
    return None


def _period(source: _Source, raw: Mapping[str, Any], line: int | None, where: str) -> tuple[datetime | None, datetime | None]:
    values: dict[str, datetime | None] = {"from": None, "to": None}
    for key in ("from", "to"):
        if key not in raw:
            if key == "from":
                source.problem(line, where, "missing from (an instant with its offset, e.g. 2026-04-24T00:00:00Z)")
            continue
        value = raw[key]
        key_line = source.locator.key(line, key)
        if isinstance(value, datetime) and value.tzinfo is not None:
            values[key] = value.astimezone(timezone.utc)
        elif isinstance(value, (datetime, date)):
            source.problem(key_line, where,
                           f"{key} = {value} has no UTC offset: write an instant such as {value:%Y-%m-%d}T00:00:00Z")
        else:
            source.problem(key_line, where, f"{key} must be an instant such as 2026-04-24T00:00:00Z, got {value!r}")
    start, end = values["from"], values["to"]
    if start is not None and end is not None and end <= start:
        source.problem(source.locator.key(line, "to"), where,
                       f"to ({_instant(end)}) is not after from ({_instant(start)})")
        return start, None
    return start, end


def _text(source: _Source, raw: Mapping[str, Any], key: str, line: int | None, where: str, *, required: bool) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            source.problem(line, where, f"missing {key} (where this comes from: a page, a snapshot, a contract)")
        return None
    if not isinstance(value, str) or not value.strip():
        source.problem(source.locator.key(line, key), where, f"{key} must be non-empty text")
        return None
    return value.strip()


def _build_alias(source: _Source, index: int, raw: dict[str, Any], layer: int) -> Alias | None:
    line = source.locator.array_item("alias", index)
    name, model = raw.get("name"), raw.get("model")
    where = f"alias #{index + 1} ({name or '?'})"
    before = len(source.problems)
    _unknown_keys(source, raw, _ALIAS_KEYS, line, where)
    for key, value in (("name", name), ("model", model)):
        if not isinstance(value, str) or not value.strip():
            source.problem(line, where, f"missing {key}")
    start, end = _period(source, raw, line, where)
    text = _text(source, raw, "source", line, where, required=True)
    note = _text(source, raw, "note", line, where, required=False)
    if isinstance(name, str) and name == model:
        source.problem(source.locator.key(line, "model"), where, f"alias loop: {name} is an alias of itself")
    if len(source.problems) > before or start is None:
        return None
    assert isinstance(name, str) and isinstance(model, str)
    return Alias(name=name, model=model, start=start, end=end, source=text or "", note=note,
                 location=source.at(line), layer=layer)


def _overlap(a_start: datetime, a_end: datetime | None, b_start: datetime, b_end: datetime | None) -> bool:
    return (b_end is None or a_start < b_end) and (a_end is None or b_start < a_end)


def _instant(value: datetime | None) -> str:
    if value is None:
        return "open end"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _tariff_where(tariff: Tariff, index: int | None = None) -> str:
    return f"tariff ({tariff.id})" if index is None else f"tariff #{index} ({tariff.id})"


def _alias_where(alias: Alias) -> str:
    return f"alias ({alias.name} -> {alias.model})"


def _check_tariff_overlaps(source: _Source, tariffs: Iterable[Tariff]) -> None:
    by_model: dict[str, list[Tariff]] = {}
    for tariff in tariffs:
        by_model.setdefault(tariff.model, []).append(tariff)
    seen_ids: dict[str, Tariff] = {}
    for tariff in tariffs:
        earlier = seen_ids.get(tariff.id)
        if earlier is not None:
            source.problem(tariff.location.line, _tariff_where(tariff),
                           f"duplicate id {tariff.id!r} (also {earlier.location}); give one of them an id = \"...\"")
        seen_ids.setdefault(tariff.id, tariff)
    for model, entries in by_model.items():
        entries.sort(key=lambda t: (t.start, t.location.line or 0))
        for i, first in enumerate(entries):
            for second in entries[i + 1 :]:
                shared = sorted(set(first.currencies) & set(second.currencies))
                if shared and _overlap(first.start, first.end, second.start, second.end):
                    until = min((e for e in (first.end, second.end) if e is not None), default=None)
                    source.problem(
                        second.location.line, _tariff_where(second),
                        f"overlaps {_tariff_where(first)} at {first.location} for {model} in {shared[0]}: "
                        f"both apply from {_instant(max(first.start, second.start))} to {_instant(until)}",
                    )


def _check_alias_overlaps(source: _Source, aliases: Sequence[Alias], tariffs: Sequence[Tariff]) -> None:
    by_name: dict[str, list[Alias]] = {}
    for alias in aliases:
        by_name.setdefault(alias.name, []).append(alias)
    for name, entries in by_name.items():
        entries.sort(key=lambda a: a.start)
        for i, first in enumerate(entries):
            for second in entries[i + 1 :]:
                if first.overlaps(second.start, second.end):
                    source.problem(second.location.line, _alias_where(second),
                                   f"overlaps {_alias_where(first)} at {first.location}: "
                                   f"{name} cannot be billed as two models at once")
        for alias in entries:
            for tariff in tariffs:
                if tariff.model == name and alias.overlaps(tariff.start, tariff.end):
                    source.problem(alias.location.line, _alias_where(alias),
                                   f"{name} also has its own {_tariff_where(tariff)} at {tariff.location} in the same "
                                   f"period: a name is either an alias or priced, not both")


def _check_alias_loops(sources: Sequence[_Source], aliases: Sequence[Alias]) -> None:
    """A chain of aliases in force at the same time that comes back to where it started."""
    by_name: dict[str, list[Alias]] = {}
    for alias in aliases:
        by_name.setdefault(alias.name, []).append(alias)
    reported: set[frozenset[str]] = set()
    for alias in aliases:
        # Walk every chain from `alias`, narrowing the time span to where each next link applies.
        stack: list[tuple[Alias, datetime, datetime | None, tuple[str, ...]]] = [
            (alias, alias.start, alias.end, (alias.name,))
        ]
        while stack:
            link, start, end, names = stack.pop()
            for nxt in by_name.get(link.model, ()):
                if not nxt.overlaps(start, end):
                    continue
                span_start = max(start, nxt.start)
                span_end = end if nxt.end is None else (nxt.end if end is None else min(end, nxt.end))
                if nxt.model == alias.name:
                    loop = (*names, nxt.name, nxt.model)
                    key = frozenset(loop)
                    if key not in reported:
                        reported.add(key)
                        sources[alias.layer].problem(
                            alias.location.line, _alias_where(alias),
                            f"alias loop: {' -> '.join(loop)} (from {_instant(span_start)})",
                        )
                    continue
                if nxt.name in names or len(names) > len(aliases):
                    continue
                stack.append((nxt, span_start, span_end, (*names, nxt.name)))


def _is_date(value: Any) -> bool:
    return isinstance(value, date) and not isinstance(value, datetime)
