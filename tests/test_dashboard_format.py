"""The dashboard writes money with its currency and thousands separators, tokens with units."""

from __future__ import annotations

from decimal import Decimal

import pytest

from dashboard import format as fmt


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        (Decimal("1682"), "USD", "$1,682.00"),
        (Decimal("168.004999"), "USD", "$168.00"),
        (Decimal("0.005"), "USD", "$0.01"),  # half up, as an invoice rounds
        (Decimal("1234567.891"), "CNY", "¥1,234,567.89"),
        (Decimal("-12.5"), "USD", "-$12.50"),
        (Decimal("3.1"), "EUR", "3.10 EUR"),
        (Decimal("-0.001"), "USD", "$0.00"),
    ],
)
def test_money_shows_currency_and_thousands_separators(amount: Decimal, currency: str, expected: str) -> None:
    assert fmt.money(amount, currency) == expected


def test_money_keeps_more_places_when_asked_for_small_per_call_amounts() -> None:
    assert fmt.money(Decimal("0.000123456"), "USD", places=6) == "$0.000123"


def test_money_refuses_a_float_because_money_never_went_through_binary_floating_point() -> None:
    with pytest.raises(TypeError):
        fmt.money(0.1, "USD")  # type: ignore[arg-type]


def test_unknown_money_is_a_dash_and_an_unpriced_call_says_so_rather_than_zero() -> None:
    assert fmt.money(None, "USD") == "—"
    assert fmt.money_or_unpriced(None, None) == "unpriced"
    assert fmt.money_or_unpriced(Decimal(0), "USD") == "$0.00"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (950, "950"),
        (1000, "1K"),
        (1500, "1.5K"),
        (12_345, "12.3K"),
        (123_456, "123K"),
        (999_999, "1M"),
        (2_000_000, "2M"),
        (2_200_000_000, "2.2B"),
        (300_000_000, "300M"),
        (-1500, "-1.5K"),
    ],
)
def test_tokens_have_three_significant_digits_and_a_unit(value: int, expected: str) -> None:
    assert fmt.tokens(value) == expected


def test_counts_percentages_and_durations_read_like_a_person_writes_them() -> None:
    assert fmt.count(1_000_000) == "1,000,000"
    assert fmt.percent(0.4251) == "42.5%"
    assert fmt.signed_percent(-0.035) == "-3.5%"
    assert fmt.signed_percent(None) == "—"
    assert fmt.milliseconds(850.4) == "850 ms"
    assert fmt.milliseconds(12_400) == "12.4 s"


def test_markdown_text_escapes_what_streamlit_would_read_as_latex_links_or_directives() -> None:
    # Two dollar amounts in one Markdown element would otherwise be typeset as LaTeX between them.
    assert fmt.markdown_text("$908.84 + $1.00") == r"\$908.84 + \$1.00"
    assert fmt.markdown_text(":red[x] *y* [z](w) <b>") == r"\:red\[x\] \*y\* \[z\](w) \<b\>"
    plain = "Spend, Nov 05 – Dec 04 · 70.2% · ¥12.50 · 3.10 EUR · 1.63B"
    assert fmt.markdown_text(plain) == plain
