"""The price book: the shipped data says what api-facts says, and a broken book is refused with every problem located."""

from __future__ import annotations

import textwrap
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from collector.pricebook import (
    PriceBookError,
    Rates,
    check_book,
    load_book,
    parse_book,
    shipped_book,
)

UTC = timezone.utc


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


GOOD = """\
[book]
name = "team contract"
currency = "USD"

[[tariff]]
model = "m1"
from = 2026-01-01T00:00:00Z
to = 2026-02-01T00:00:00Z
prices.standard.USD = { hit = 0.1, miss = 1, output = 2 }
source = "contract 2026-01"
"""


def _write(tmp_path: Path, text: str, name: str = "team.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = _write(tmp_path, text)
    book, problems = check_book(path)
    assert book is None, "the book should have been refused"
    return [str(p) for p in problems]


# -- the shipped book ------------------------------------------------------------------------


def test_shipped_book_loads_and_every_entry_names_its_source() -> None:
    book = shipped_book()
    assert book.tariffs and book.aliases
    for tariff in book.tariffs:
        assert tariff.source.strip(), tariff.id
    for alias in book.aliases:
        assert alias.source.strip(), alias.name
    for schedule in book.schedules.values():
        assert schedule.source.strip(), schedule.name
    for calendar in book.calendars.values():
        assert calendar.source.strip(), calendar.name


def test_shipped_book_covers_deepseek_from_2024_to_today_in_usd() -> None:
    book = shipped_book()
    assert book.currency == "USD" and book.price_at == "started_at"
    assert book.first_start == _at("2024-05-01T00:00:00Z")
    for instant, models in [
        ("2024-06-01T00:00:00Z", {"deepseek-chat", "deepseek-coder"}),
        ("2025-03-01T00:00:00Z", {"deepseek-chat", "deepseek-reasoner"}),
        ("2026-04-25T00:00:00Z", {"deepseek-v4-flash", "deepseek-v4-pro"}),
        ("2026-11-23T00:00:00Z", {"deepseek-flash", "deepseek-v4-pro"}),
    ]:
        assert set(book.models_at(_at(instant))) == models, instant


@pytest.mark.parametrize(
    ("model", "instant", "period", "currency", "expected"),
    [
        # api-facts section 4, figure for figure (USD / CNY per 1M tokens: hit, miss, output)
        ("deepseek-chat", "2024-06-01T00:00:00Z", "standard", "CNY", ("1", "1", "2")),
        ("deepseek-chat", "2025-01-01T00:00:00Z", "standard", "USD", ("0.014", "0.14", "0.28")),
        ("deepseek-reasoner", "2025-01-21T00:00:00Z", "standard", "CNY", ("1", "4", "16")),
        ("deepseek-chat", "2025-02-10T00:00:00Z", "standard", "CNY", ("0.5", "2", "8")),
        ("deepseek-reasoner", "2025-03-01T17:00:00Z", "discount", "CNY", ("0.25", "1", "4")),
        ("deepseek-chat", "2025-09-10T00:00:00Z", "standard", "USD", ("0.07", "0.56", "1.68")),
        ("deepseek-chat", "2025-10-10T00:00:00Z", "standard", "USD", ("0.028", "0.28", "0.42")),
        ("deepseek-v4-pro", "2026-06-01T00:00:00Z", "standard", "CNY", ("0.025", "3", "6")),
        ("deepseek-v4-flash", "2026-08-17T02:00:00Z", "peak", "USD", ("0.014", "0.44", "1.32")),
        ("deepseek-flash", "2026-09-14T02:00:00Z", "peak", "CNY", ("0.04", "2", "8")),
        ("deepseek-v4-pro", "2026-09-14T02:00:00Z", "peak", "CNY", ("0.30", "9", "27")),
        ("deepseek-v4-pro", "2026-09-14T12:00:00Z", "off-peak", "CNY", ("0.15", "4.5", "13.5")),
    ],
)
def test_shipped_prices_are_the_published_figures(model: str, instant: str, period: str, currency: str,
                                                  expected: tuple[str, str, str]) -> None:
    resolution = shipped_book().resolve(model, _at(instant), currency)
    assert resolution is not None
    assert resolution.tariff.period_at(_at(instant)) == period
    assert resolution.tariff.rates(period, currency) == Rates(*(Decimal(v) for v in expected))


def test_v4_pro_launch_is_a_promotion_that_keeps_its_list_prices_beside_it() -> None:
    tariff = shipped_book().resolve("deepseek-v4-pro", _at("2026-04-25T00:00:00Z"))
    assert tariff is not None
    entry = tariff.tariff
    assert entry.promotion is not None and "75%" in entry.promotion
    assert entry.rates("standard", "USD") == Rates(Decimal("0.03625"), Decimal("0.435"), Decimal("0.87"))
    assert entry.rates("standard", "USD", list_prices=True) == Rates(Decimal("0.145"), Decimal("1.74"), Decimal("3.48"))


def test_promotion_made_permanent_is_no_longer_a_promotion() -> None:
    resolution = shipped_book().resolve("deepseek-v4-pro", _at("2026-06-01T00:00:00Z"))
    assert resolution is not None and resolution.tariff.promotion is None
    assert resolution.tariff.rates("standard", "USD") == Rates(Decimal("0.003625"), Decimal("0.435"), Decimal("0.87"))


def test_holiday_calendar_holds_2026_arrangement_and_2027_statutory_days() -> None:
    calendar = shipped_book().calendars["cn-public-holidays"]
    assert calendar.years == (2026, 2027)
    assert len([d for d in calendar.holidays if d.year == 2026]) == 33  # 3+9+3+5+3+3+7 days off
    assert {date(2026, 10, d) for d in range(1, 8)} <= calendar.holidays
    assert date(2026, 10, 8) not in calendar.holidays
    assert calendar.working_days == {date(2026, 1, 4), date(2026, 2, 14), date(2026, 2, 28), date(2026, 5, 9),
                                     date(2026, 9, 20), date(2026, 10, 10)}
    assert len([d for d in calendar.holidays if d.year == 2027]) == 13  # statutory days (2024 revision)
    assert date(2027, 2, 6) in calendar.holidays  # Spring Festival 2027 (lunar new year)


# -- loading: --prices / DSMETER_PRICES, replace or extend -----------------------------------


def test_a_team_book_replaces_the_shipped_one_unless_it_extends_it(tmp_path: Path) -> None:
    team = load_book(_write(tmp_path, GOOD))
    assert team.resolve("m1", _at("2026-01-15T00:00:00Z")) is not None
    assert team.resolve("deepseek-flash", _at("2026-11-01T00:00:00Z")) is None  # replaced: no public prices

    extended = load_book(_write(tmp_path, """\
        [book]
        extends = "dsmeter"
        name = "negotiated"

        [[tariff]]
        model = "deepseek-v4-pro"
        from = 2026-10-01T00:00:00Z
        prices.standard.USD = { hit = 0.01, miss = 0.5, output = 1.5 }
        source = "our contract with DeepSeek, signed 2026-09-20"
        """, "ext.toml"))
    ours = extended.resolve("deepseek-v4-pro", _at("2026-10-05T02:00:00Z"))
    assert ours is not None and ours.tariff.rates("standard", "USD") == Rates(Decimal("0.01"), Decimal("0.5"), Decimal("1.5"))
    before = extended.resolve("deepseek-v4-pro", _at("2026-09-15T02:00:00Z"))
    assert before is not None and before.tariff.id == "deepseek-v4-pro@2026-09-10"  # the shipped entry, where ours does not apply
    flash = extended.resolve("deepseek-v4-flash", _at("2026-10-05T02:00:00Z"))
    assert flash is not None and flash.tariff.model == "deepseek-flash"  # shipped aliases still apply
    assert "over the dsmeter shipped book" in extended.origin


def test_dsmeter_prices_environment_variable_picks_the_book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSMETER_PRICES", str(_write(tmp_path, GOOD)))
    assert load_book().name == "team contract"
    monkeypatch.delenv("DSMETER_PRICES")
    assert load_book().name.startswith("DeepSeek public prices")


def test_an_extending_book_can_correct_the_shipped_holiday_calendar(tmp_path: Path) -> None:
    tuesday_peak = _at("2027-02-09T02:00:00Z")  # 10:00 Beijing, the day after the statutory Spring Festival days
    shipped = shipped_book().resolve("deepseek-flash", tuesday_peak)
    assert shipped is not None and shipped.tariff.period_at(tuesday_peak) == "peak"
    corrected = load_book(_write(tmp_path, """\
        [book]
        extends = "dsmeter"

        [calendar.cn-public-holidays]
        years = [2027]
        source = "State Council 2027 arrangement (as the team transcribed it)"
        holidays = [2027-02-05, 2027-02-06, 2027-02-07, 2027-02-08, 2027-02-09, 2027-02-10, 2027-02-11]
        """))
    resolution = corrected.resolve("deepseek-flash", tuesday_peak)
    assert resolution is not None and resolution.tariff.period_at(tuesday_peak) == "off-peak"


# -- broken books: every problem, located -----------------------------------------------------


def test_overlapping_periods_for_one_model_and_currency_name_both_entries(tmp_path: Path) -> None:
    problems = _problems(tmp_path, GOOD + """
[[tariff]]
model = "m1"
from = 2026-01-20T00:00:00Z
prices.standard.USD = { hit = 0.1, miss = 1, output = 2 }
source = "contract 2026-02"
""")
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'team.toml'}:12: tariff (m1@2026-01-20): overlaps tariff (m1@2026-01-01)")
    assert ":5 for m1 in USD" in problems[0] and "from 2026-01-20 00:00:00 UTC to 2026-02-01 00:00:00 UTC" in problems[0]


def test_entries_that_overlap_in_different_currencies_are_fine(tmp_path: Path) -> None:
    book = load_book(_write(tmp_path, GOOD + """
[[tariff]]
model = "m1"
from = 2026-01-20T00:00:00Z
prices.standard.CNY = { hit = 1, miss = 7, output = 14 }
source = "CNY contract"
"""))
    at = _at("2026-01-25T00:00:00Z")
    usd, cny = book.resolve("m1", at, "USD"), book.resolve("m1", at, "CNY")
    assert usd is not None and cny is not None and usd.tariff.id != cny.tariff.id


def test_a_window_that_does_not_parse_is_located(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """\
        [schedule.tou]
        time_zone = "Asia/Shanghai"
        default = "off-peak"
        source = "contract"
        windows = [
          { period = "peak", from = "09:00", to = "12:00" },
          { period = "peak", from = "2pm", to = "18:00" },
        ]
        """)
    assert problems == [f"{tmp_path / 'team.toml'}:7: schedule tou window #2: window from does not parse: "
                        "'2pm' is not a time of day HH:MM"]


def test_a_missing_price_and_a_missing_period_are_each_named(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """\
        [schedule.tou]
        time_zone = "UTC"
        default = "off-peak"
        source = "contract"
        windows = [{ period = "peak", from = "09:00", to = "17:00" }]

        [[tariff]]
        model = "m1"
        from = 2026-01-01T00:00:00Z
        schedule = "tou"
        prices.peak.USD = { hit = 0.1, miss = 1 }
        source = "contract"
        """)
    path = tmp_path / "team.toml"
    assert f"{path}:11: tariff #1 (m1@2026-01-01): prices.peak.USD: missing price 'output'" in problems
    assert f"{path}:7: tariff #1 (m1@2026-01-01): missing prices for period 'off-peak'" in problems


def test_an_alias_loop_is_refused(tmp_path: Path) -> None:
    problems = _problems(tmp_path, GOOD + """
[[alias]]
name = "a"
model = "b"
from = 2026-01-01T00:00:00Z
source = "rename notice"

[[alias]]
name = "b"
model = "a"
from = 2026-01-10T00:00:00Z
source = "rename notice"
""")
    assert len(problems) == 1
    assert problems[0] == f"{tmp_path / 'team.toml'}:12: alias (a -> b): alias loop: a -> b -> a (from 2026-01-10 00:00:00 UTC)"


def test_aliases_that_would_loop_but_never_at_the_same_time_are_not_a_loop(tmp_path: Path) -> None:
    book = load_book(_write(tmp_path, """\
        [[tariff]]
        model = "b"
        from = 2026-01-01T00:00:00Z
        to = 2026-01-10T00:00:00Z
        prices.standard.USD = { hit = 0.1, miss = 1, output = 2 }
        source = "contract"

        [[tariff]]
        model = "a"
        from = 2026-01-10T00:00:00Z
        prices.standard.USD = { hit = 0.2, miss = 2, output = 4 }
        source = "contract"

        [[alias]]
        name = "a"
        model = "b"
        from = 2026-01-01T00:00:00Z
        to = 2026-01-10T00:00:00Z
        source = "rename notice"

        [[alias]]
        name = "b"
        model = "a"
        from = 2026-01-10T00:00:00Z
        source = "rename notice"
        """))
    early, late = book.resolve("a", _at("2026-01-05T00:00:00Z")), book.resolve("b", _at("2026-01-15T00:00:00Z"))
    assert early is not None and early.tariff.model == "b" and early.via == "a"
    assert late is not None and late.tariff.model == "a" and late.via == "b"


def test_an_alias_to_an_unknown_model_is_refused(tmp_path: Path) -> None:
    problems = _problems(tmp_path, GOOD + """
[[alias]]
name = "chat"
model = "m9"
from = 2026-01-01T00:00:00Z
source = "rename notice"
""")
    assert problems == [f"{tmp_path / 'team.toml'}:12: alias (chat -> m9): alias to unknown model 'm9': "
                        "no tariff or alias in the book names it"]


@pytest.mark.parametrize(
    ("old", "new", "line", "where", "message"),
    [
        ("to = 2026-02-01T00:00:00Z", "to = 2025-12-01T00:00:00Z", 8, "tariff #1 (m1@2026-01-01)",
         "to (2025-12-01 00:00:00 UTC) is not after from (2026-01-01 00:00:00 UTC)"),
        ("miss = 1,", "miss = -1,", 9, "tariff #1 (m1@2026-01-01)", "prices.standard.USD: price miss is negative (-1)"),
        ("hit = 0.1,", "hit = 0.0000001,", 9, "tariff #1 (m1@2026-01-01)",
         "prices.standard.USD: price hit 0.0000001 has more than 6 decimal places per 1,000,000 tokens"),
        ('source = "contract 2026-01"', "", 5, "tariff #1 (m1@2026-01-01)", "missing source"),
        ("from = 2026-01-01T00:00:00Z", "from = 2026-01-01T00:00:00", 7, "tariff #1 (m1)",
         "from = 2026-01-01 00:00:00 has no UTC offset"),
        ('model = "m1"', 'modle = "m1"', 6, "tariff #1 (?)", "unknown key 'modle'"),
        ("output = 2", "output = 2, input = 3", 9, "tariff #1 (m1@2026-01-01)", "prices.standard.USD: unknown price 'input'"),
        ('currency = "USD"', 'currency = "usd"', 3, "[book]", "currency must be a 3-letter ISO code"),
    ],
    ids=["to-not-after-from", "negative-price", "too-many-decimals", "no-source", "no-offset", "unknown-key",
         "unknown-price", "bad-currency"],
)
def test_each_broken_entry_is_named_with_its_line(tmp_path: Path, old: str, new: str, line: int, where: str,
                                                  message: str) -> None:
    assert old in GOOD
    problems = _problems(tmp_path, GOOD.replace(old, new))
    matching = [p for p in problems if message in p]
    assert matching, problems
    assert matching[0].startswith(f"{tmp_path / 'team.toml'}:{line}: {where}: "), matching[0]


def test_an_unknown_time_zone_is_refused(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """\
        [schedule.tou]
        time_zone = "Asia/Beijing"
        default = "off-peak"
        source = "contract"
        windows = [{ period = "peak", from = "09:00", to = "12:00" }]
        """)
    assert problems == [f"{tmp_path / 'team.toml'}:2: schedule tou: unknown time zone 'Asia/Beijing'"]


def test_windows_of_different_periods_that_overlap_are_refused(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """\
        [schedule.tou]
        time_zone = "UTC"
        default = "standard"
        source = "contract"
        windows = [
          { period = "peak", days = ["mon"], from = "09:00", to = "12:00" },
          { period = "night", from = "22:00", to = "10:00" },
        ]
        """)
    assert problems == [f"{tmp_path / 'team.toml'}:7: schedule tou window #2: night 22:00-10:00 every day overlaps "
                        "peak 09:00-12:00 mon (both claim mon 09:00)"]


def test_a_promotion_needs_its_list_prices(tmp_path: Path) -> None:
    problems = _problems(tmp_path, GOOD.replace('source = "contract 2026-01"',
                                                'source = "contract 2026-01"\npromotion = "launch: 50% off"'))
    assert problems == [f"{tmp_path / 'team.toml'}:11: tariff #1 (m1@2026-01-01): a promotion must give its list prices beside it "
                        "(list.<period>.<currency> = {...})"]


def test_toml_syntax_errors_give_the_line(tmp_path: Path) -> None:
    problems = _problems(tmp_path, GOOD.replace("hit = 0.1,", "hit = 0.1"))
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'team.toml'}:9: not valid TOML: ")


def test_every_problem_of_a_book_is_reported_at_once(tmp_path: Path) -> None:
    broken = GOOD.replace("miss = 1", "miss = -1").replace('currency = "USD"', 'currency = "dollars"')
    with pytest.raises(PriceBookError) as caught:
        load_book(_write(tmp_path, broken))
    messages = [str(p) for p in caught.value.problems]
    assert any("currency must be a 3-letter ISO code" in m for m in messages)
    assert any("price miss is negative" in m for m in messages)
    assert "(and 1 more; `dsmeter prices check FILE` lists them all)" in str(caught.value)


def test_a_missing_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    book, problems = check_book(tmp_path / "nope.toml")
    assert book is None and len(problems) == 1 and "cannot read the price book" in str(problems[0])


def test_parse_book_reads_text_with_a_name_for_messages() -> None:
    with pytest.raises(PriceBookError, match=r"^inline:8: tariff #1 \(m1@2026-01-01\): to \("):
        parse_book(GOOD.replace("to = 2026-02-01", "to = 2025-02-01"), filename="inline")
