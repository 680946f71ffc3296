"""Every dashboard page, rendered by ``streamlit.testing.v1.AppTest`` against a ledger seeded through the real writer.

Each page must render without an exception, and the figures it shows must be the query
layer's figures for the same filters (and, for the headline totals, the sums of the seeded
rows computed here independently). Runs on SQLite and, when configured, PostgreSQL.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from collector import queries
from collector.record import UsageRecord
from dashboard import data
from dashboard import format as fmt
from dashboard.engine import open_read_only
from dashboard.selection import Selection
from dashboard_figures import figure, figures
from dashboard_seed import seed_through_writer, synthetic_records

APP = str(Path(data.__file__).resolve().parent / "app.py")
NOW = datetime(2026, 11, 20, 15, 30, tzinfo=timezone.utc)
TODAY = NOW.date()
PAGES = ("app_pages/overview.py", "app_pages/chargeback.py", "app_pages/calls.py", "app_pages/whatif.py", "app_pages/prices.py")


@dataclass
class Ledger:
    url: str
    records: list[UsageRecord]


def _default_selection() -> Selection:
    return Selection(start=TODAY - timedelta(days=29), end=TODAY)


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test reads its own ledger with cold caches and a pinned "now"."""
    monkeypatch.setenv(data.ENV_NOW, NOW.isoformat())
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()  # disposes the engines (on_release), so PostgreSQL databases can be dropped


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """One ledger per database for the whole module: the dashboard only reads it (a test checks that).

    45 days of calls up to "now": some fall before the default 30-day range, some in the previous month.
    The apps sent the request's `user` field only from the default range's first day on, and
    even then one call in five carries none.
    """
    from conftest import _fresh_postgres_database, _postgres_admin_url

    records = list(synthetic_records(600, seed=11, start=NOW - timedelta(days=45), end=NOW))
    for n, record in enumerate(records):
        if record.started_at.date() < _default_selection().start or n % 5 == 0:
            record.user = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSMETER_HOME", str(tmp_path_factory.mktemp("dsmeter-home")))  # the writer's spool
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
            seed_through_writer(url, records)
            yield Ledger(url, records)
            return
        admin = _postgres_admin_url()
        if admin is None:
            pytest.skip("DSMETER_TEST_POSTGRES_URL not set")
        for url in _fresh_postgres_database(admin):
            seed_through_writer(url, records)
            yield Ledger(url, records)


@pytest.fixture
def ledger(seeded: Ledger, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    monkeypatch.setenv("DSMETER_DATABASE_URL", seeded.url)
    return seeded


def _sidebar_widgets(node: object) -> list[object]:
    children = list(getattr(node, "children", {}).values())
    return children + [w for child in children for w in _sidebar_widgets(child)]


def _set_sidebar(at: AppTest, **sidebar: object) -> AppTest:
    """Set sidebar filter widgets by key, one at a time, as a person would (a tag's values appear after its key)."""
    for key, value in sidebar.items():
        widget = next((w for w in _sidebar_widgets(at.sidebar) if getattr(w, "key", None) == key), None)
        assert widget is not None, f"no sidebar widget {key!r}"
        widget.set_value(value)  # type: ignore[attr-defined]
        at.run()
        assert not at.exception, [e.message for e in at.exception]
    return at


def _app(**sidebar: object) -> AppTest:
    """The app's first page (the overview), with sidebar filters set by widget key."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return _set_sidebar(at, **sidebar)


def _page(page: str, **sidebar: object) -> AppTest:
    at = _app(**sidebar)
    at.switch_page(page).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _metric(at: AppTest, label: str) -> str:
    for metric in at.metric:
        if metric.label == label or metric.label.startswith(label):
            return str(metric.value)
    raise AssertionError(f"no metric {label!r}; have {[m.label for m in at.metric]}")


def _in_range(records: list[UsageRecord], start: date, end: date) -> list[UsageRecord]:
    return [r for r in records if start <= r.started_at.date() <= end]


def _cost(records: list[UsageRecord]) -> Decimal:
    return sum((r.cost for r in records if r.cost is not None), Decimal(0))


# -- Overview -------------------------------------------------------------------------------------


def test_overview_headline_figures_are_the_ledger_sums_for_the_default_range(ledger: Ledger) -> None:
    at = _app()  # the overview is the default page
    selection = _default_selection()
    shown = _in_range(ledger.records, selection.start, selection.end)
    assert figure(at, "Spend, ") == fmt.money(_cost(shown), "USD")
    assert figure(at, "Spend today") == fmt.money(_cost(_in_range(ledger.records, TODAY, TODAY)), "USD")
    month = _in_range(ledger.records, TODAY.replace(day=1), TODAY)
    assert figure(at, "This month") == fmt.money(_cost(month), "USD")
    assert figure(at, "Calls") == fmt.count(len(shown))
    assert figure(at, "Errors") == fmt.count(sum(1 for r in shown if r.status == "error"))
    assert figure(at, "Cancelled") == fmt.count(sum(1 for r in shown if r.status == "cancelled"))
    hit = sum(r.prompt_cache_hit_tokens or 0 for r in shown)
    miss = sum(r.prompt_cache_miss_tokens or 0 for r in shown)
    assert figure(at, "Cache-hit ratio") == fmt.percent(hit / (hit + miss))
    output = sum(r.completion_tokens or 0 for r in shown)
    assert any(f"{fmt.tokens(hit)} cache hit · {fmt.tokens(miss)} cache miss · {fmt.tokens(output)} output" in c.value
               for c in at.caption)


def test_overview_forecast_is_the_query_layers_as_of_the_start_of_today(ledger: Ledger) -> None:
    at = _app()
    start_of_today = datetime(TODAY.year, TODAY.month, TODAY.day, tzinfo=timezone.utc)
    forecast = queries.month_forecast(open_read_only(ledger.url), queries.Filters(), start_of_today)["USD"]
    assert figure(at, "Month-end forecast") == fmt.money(forecast.forecast, "USD")
    before_today = _in_range(ledger.records, TODAY.replace(day=1), TODAY - timedelta(days=1))
    assert forecast.month_to_date == _cost(before_today)  # complete days only; today is projected


def test_overview_figures_follow_the_sidebar_filters_exactly_as_the_query_layer_does(ledger: Ledger) -> None:
    at = _app(filter_models=["deepseek-v4-pro"], filter_tag_key="team", filter_tag_values=["support", "analytics"])
    selection = Selection(start=TODAY - timedelta(days=29), end=TODAY, models=("deepseek-v4-pro",),
                          tag_key="team", tag_values=("support", "analytics"))
    totals = queries.totals(open_read_only(ledger.url), data.to_filters(selection))
    assert figure(at, "Spend, ") == fmt.money(totals.cost["USD"].total, "USD")
    assert figure(at, "Calls") == fmt.count(totals.calls)
    assert figure(at, "Errors") == fmt.count(totals.errors)
    assert figure(at, "Saved by the cache") == fmt.money(totals.cache_saved["USD"], "USD")
    independent = [r for r in _in_range(ledger.records, selection.start, selection.end)
                   if r.model == "deepseek-v4-pro" and r.tags["team"] in ("support", "analytics")]
    assert figure(at, "Calls") == fmt.count(len(independent))
    assert figure(at, "Spend, ") == fmt.money(_cost(independent), "USD")


@pytest.mark.parametrize("unpriced", [1, 7])
def test_overview_counts_the_calls_it_could_not_price_and_leaves_them_out_of_spend(
    unpriced: int, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    priced = list(synthetic_records(40, seed=3, start=NOW - timedelta(days=5), end=NOW))
    # Calls with tokens on a model the price book does not know: the writer cannot price them.
    without = [r for r in synthetic_records(200, seed=4, start=NOW - timedelta(days=5), end=NOW, unpriced_share=1.0)
               if r.completion_tokens is not None][:unpriced]
    for record in without:
        record.requested_model = record.model = "acme-llm-1"
    seed_through_writer(sqlite_url, priced + without)
    monkeypatch.setenv("DSMETER_DATABASE_URL", sqlite_url)
    at = _app()
    (warning,) = at.warning
    noun = "1 call in this range has" if unpriced == 1 else f"{unpriced} calls in this range have"
    assert warning.value.startswith(f"{noun} tokens but no price")
    assert figure(at, "Calls") == fmt.count(len(priced) + unpriced)
    assert figure(at, "Spend, ") == fmt.money(_cost(priced), "USD")


def test_overview_figures_are_markdown_and_headings_not_metrics_whose_code_loads_late(ledger: Ledger) -> None:
    # st.metric's front-end code is fetched only when the first metric arrives, and the browser
    # showed the figures only with the charts, 0.6-0.7 s after they had arrived (bench_dashboard).
    at = _app()
    assert not at.metric
    assert list(figures(at)) == [
        "Spend today", "This month", "Month-end forecast",
        f"Spend, {TODAY - timedelta(days=29):%b %d} – {TODAY:%b %d}",
        "Calls", "Errors", "Cancelled", "Cache-hit ratio", "Saved by the cache",
    ]


def test_overview_draws_its_charts_with_altair(ledger: Ledger) -> None:
    import json

    at = _app()
    specs = [json.loads(chart.proto.spec) for chart in at.main.get("vega_lite_chart")]
    titles = {spec["title"] for spec in specs}
    assert {"Spend per day by model (USD)", "Spend per day by token bucket (USD)", "Cache-hit ratio per day",
            "Calls per day by outcome"} <= titles


def _chart(at: AppTest, title: str) -> pd.DataFrame:
    """The data a chart draws (Altair hands Streamlit one Arrow dataset per chart), found by its title."""
    import json

    import pyarrow as pa

    for chart in at.get("vega_lite_chart"):
        if json.loads(chart.proto.spec).get("title") == title:
            (dataset,) = chart.proto.datasets
            frame = pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()
            if "day" in frame:
                frame["day"] = pd.to_datetime(frame["day"]).dt.date
            return frame
    raise AssertionError(f"no chart {title!r}")


def _per(records: list[UsageRecord], key: object, value: object) -> dict[object, float]:
    """Sums of ``value(record)`` per ``key(record)``, skipping None values, as floats (what a chart draws)."""
    sums: dict[object, Decimal] = {}
    for record in records:
        amount = value(record)  # type: ignore[operator]
        if amount is not None:
            group = key(record)  # type: ignore[operator]
            sums[group] = sums.get(group, Decimal(0)) + Decimal(amount)
    return {group: float(total) for group, total in sums.items()}


@pytest.mark.parametrize("statuses", [(), ("completed", "cancelled")], ids=["every-status", "two-statuses"])
def test_overview_charts_draw_the_seeded_rows_sums_per_day(ledger: Ledger, statuses: tuple[str, ...]) -> None:
    at = _app(**({"filter_statuses": list(statuses)} if statuses else {}))
    selection = _default_selection()
    shown = [r for r in _in_range(ledger.records, selection.start, selection.end)
             if not statuses or r.status in statuses]

    def day(r: UsageRecord) -> date:
        return r.started_at.date()

    by_model = _chart(at, "Spend per day by model (USD)")
    assert dict(zip(zip(by_model["day"], by_model["model"]), by_model["spend"])) == pytest.approx(
        _per(shown, lambda r: (day(r), r.model), lambda r: r.cost))
    by_bucket = _chart(at, "Spend per day by token bucket (USD)")
    expected = {}
    for bucket, field in (("cache hit", "cost_cache_hit"), ("cache miss", "cost_cache_miss"), ("output", "cost_output")):
        expected.update(_per(shown, lambda r, b=bucket: (day(r), b), lambda r, f=field: getattr(r, f)))
    assert dict(zip(zip(by_bucket["day"], by_bucket["bucket"]), by_bucket["spend"])) == pytest.approx(expected)
    by_status = _chart(at, "Calls per day by outcome")
    assert dict(zip(zip(by_status["day"], by_status["status"]), by_status["calls"])) == pytest.approx(
        _per(shown, lambda r: (day(r), r.status), lambda r: 1))
    ratio = _chart(at, "Cache-hit ratio per day")
    assert list(ratio["day"]) == [selection.start + timedelta(days=n) for n in range(selection.days)]
    hits = _per(shown, day, lambda r: r.prompt_cache_hit_tokens)
    prompts = _per(shown, day, lambda r: (r.prompt_cache_hit_tokens or 0) + (r.prompt_cache_miss_tokens or 0))
    drawn = {d: v for d, v in zip(ratio["day"], ratio["cache_hit_ratio"]) if not pd.isna(v)}
    assert drawn == pytest.approx({d: hits.get(d, 0.0) / total for d, total in prompts.items() if total})


# -- Chargeback -----------------------------------------------------------------------------------


def test_chargeback_by_team_matches_the_ledger_with_shares_and_a_csv(ledger: Ledger) -> None:
    at = _page("app_pages/chargeback.py")
    at.radio(key="chargeback_by").set_value("tag:team").run()
    assert not at.exception
    table = at.dataframe[0].value
    selection = _default_selection()
    shown = [r for r in _in_range(ledger.records, selection.start, selection.end) if r.cost is not None]
    total = _cost(shown)
    for team in {r.tags["team"] for r in shown}:
        spend = _cost([r for r in shown if r.tags["team"] == team])
        row = table[table["group"] == team].iloc[0]
        assert row["spend"] == fmt.money(spend, "USD")
        assert row["share"] == fmt.percent(spend / total)
    csv_bytes = data.chargeback_csv(data.chargeback(selection, "tag:team"))
    frame = pd.read_csv(io.BytesIO(csv_bytes), dtype=str)
    assert sum(Decimal(v) for v in frame["spend"]) == total  # exact, not rounded, in the download


def test_chargeback_by_key_fingerprint_equals_the_query_layer(ledger: Ledger) -> None:
    at = _page("app_pages/chargeback.py")
    at.radio(key="chargeback_by").set_value(data.KEY_FINGERPRINT).run()
    assert not at.exception
    table = at.dataframe[0].value
    expected = data.chargeback(_default_selection(), data.KEY_FINGERPRINT).rows
    assert list(table["group"]) == list(expected["group"])
    assert list(table["spend"]) == [fmt.money(v, "USD") for v in expected["spend"]]


def _chargeback_by_user(at: AppTest) -> AppTest:
    at.radio(key="chargeback_by").set_value(data.END_USER).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def test_chargeback_by_end_user_shows_the_query_layers_figures_and_the_hand_sums(ledger: Ledger) -> None:
    at = _chargeback_by_user(_page("app_pages/chargeback.py"))
    assert any("reads the ledger itself, not the daily rollup" in c.value for c in at.caption)
    table = at.dataframe[0].value
    selection = _default_selection()
    top = queries.top_spenders(open_read_only(ledger.url), data.to_filters(selection), "user",
                               limit=data.CHARGEBACK_LIMIT)
    assert list(table["group"]) == ["(no user)" if g is None else g for g in top["group"]]
    assert list(table["spend"]) == [fmt.money(v, "USD") for v in top["cost"]]
    assert list(table["share"]) == [fmt.percent(v) for v in top["share"]]
    shown = [r for r in _in_range(ledger.records, selection.start, selection.end) if r.cost is not None]
    spend = {user: _cost([r for r in shown if r.user == user]) for user in {r.user for r in shown}}
    assert None in spend and len(spend) == 7  # u-1 ... u-6, and the calls that sent no user
    for user, amount in spend.items():
        row = table[table["group"] == ("(no user)" if user is None else user)].iloc[0]
        assert row["spend"] == fmt.money(amount, "USD")
        assert row["calls"] == fmt.count(sum(1 for r in shown if r.user == user))
        on_today = _cost([r for r in shown if r.user == user and r.started_at.date() == TODAY])
        assert row["last_day"] == fmt.money(on_today, "USD")


def test_chargeback_csv_by_end_user_has_the_exact_amounts(ledger: Ledger) -> None:
    selection = _default_selection()
    frame = pd.read_csv(io.BytesIO(data.chargeback_csv(data.chargeback(selection, data.END_USER))), dtype=str,
                        keep_default_na=False)
    assert list(frame.columns)[0] == "End user"
    shown = [r for r in _in_range(ledger.records, selection.start, selection.end) if r.cost is not None]
    expected = {("(no user)" if user is None else user): _cost([r for r in shown if r.user == user])
                for user in {r.user for r in shown}}
    assert {user: Decimal(v) for user, v in zip(frame["End user"], frame["spend"])} == expected
    today = {("(no user)" if user is None else user): _cost([r for r in shown if r.user == user
                                                             and r.started_at.date() == TODAY])
             for user in {r.user for r in shown}}
    assert {user: Decimal(v) for user, v in zip(frame["End user"], frame[f"spend_{TODAY.isoformat()}"])} == today


def test_chargeback_offers_the_end_user_only_where_the_selected_calls_carry_one(ledger: Ledger) -> None:
    at = _chargeback_by_user(_page("app_pages/chargeback.py"))
    offered = data.dimension_choice(data.END_USER)  # the radio's options are the labels it shows
    assert offered in at.radio(key="chargeback_by").options
    # The fortnight before the default range: its calls were recorded before the apps sent `user`.
    before = (_default_selection().start - timedelta(days=14), _default_selection().start - timedelta(days=1))
    _set_sidebar(at, filter_dates=before)
    radio = at.radio(key="chargeback_by")
    assert offered not in radio.options and radio.value != data.END_USER
    assert not any("reads the ledger itself" in c.value for c in at.caption)


# -- Calls ----------------------------------------------------------------------------------------


def test_calls_page_lists_the_newest_matching_calls_and_counts_them(ledger: Ledger) -> None:
    at = _page("app_pages/calls.py")
    selection = _default_selection()
    shown = _in_range(ledger.records, selection.start, selection.end)
    listing = at.dataframe[0].value
    newest = sorted(shown, key=lambda r: (r.started_at, str(r.request_id)), reverse=True)
    assert len(listing) == min(100, len(shown))
    assert listing["Request id"].iloc[0] == str(newest[0].request_id)
    assert any(f"of {fmt.count(len(shown))} matching" in c.value for c in at.caption)


def test_calls_page_sorts_on_the_server_by_cost(ledger: Ledger) -> None:
    at = _page("app_pages/calls.py")
    at.selectbox(key="calls_sort").set_value("cost").run()
    assert not at.exception
    listing = at.dataframe[0].value
    selection = _default_selection()
    priced = [r for r in _in_range(ledger.records, selection.start, selection.end) if r.cost is not None]
    dearest = max(priced, key=lambda r: r.cost or Decimal(0))
    assert listing["Request id"].iloc[0] == str(dearest.request_id)


def test_calls_page_latency_percentiles_are_the_query_layers(ledger: Ledger) -> None:
    at = _page("app_pages/calls.py")
    shown = at.dataframe[1].value  # after the listing
    expected = data.latency_table(
        queries.latency_percentiles(open_read_only(ledger.url), data.to_filters(_default_selection()))
    )
    pd.testing.assert_frame_equal(shown.reset_index(drop=True), expected.reset_index(drop=True))


def test_calls_page_charts_count_finish_reasons_and_error_classes_as_the_query_layer_does(ledger: Ledger) -> None:
    at = _page("app_pages/calls.py", filter_models=["deepseek-v4-flash"])
    filters = data.to_filters(Selection(start=TODAY - timedelta(days=29), end=TODAY, models=("deepseek-v4-flash",)))
    engine = open_read_only(ledger.url)
    for title, expected, label in (("Finish reasons", queries.finish_reasons(engine, filters), "finish_reason"),
                                   ("Calls that did not complete, by class", queries.error_classes(engine, filters),
                                    "error_class")):
        drawn = _chart(at, title)
        assert dict(zip(drawn[label], drawn["calls"])) == dict(zip(expected[label], expected["calls"])), title
    classes = dict(zip(drawn["error_class"], drawn["calls"]))
    selection = _default_selection()
    flash = [r for r in _in_range(ledger.records, selection.start, selection.end) if r.model == "deepseek-v4-flash"]
    assert classes["429 rate limited"] == sum(1 for r in flash if r.http_status == 429 and r.status == "error")
    assert classes["disconnected"] == sum(1 for r in flash if r.status == "disconnected")


def test_the_filters_keep_their_values_when_the_reader_changes_page(ledger: Ledger) -> None:
    # The pages draw the filter widgets, and a widget drawn by a page is that page's own: this
    # failed (the Calls page counted every model) before the frame carried the values over.
    at = _app(filter_models=["deepseek-v4-pro"], filter_tag_key="team", filter_tag_values=["support"])
    selection = _default_selection()
    shown = [r for r in _in_range(ledger.records, selection.start, selection.end)
             if r.model == "deepseek-v4-pro" and r.tags["team"] == "support"]
    for page in ("app_pages/calls.py", "app_pages/chargeback.py", "app_pages/overview.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, [e.message for e in at.exception])
        assert at.multiselect(key="filter_models").value == ["deepseek-v4-pro"], page
        assert at.selectbox(key="filter_tag_key").value == "team", page
        assert at.multiselect(key="filter_tag_values").value == ["support"], page
        if page.endswith("calls.py"):
            assert any(f"of {fmt.count(len(shown))} matching" in c.value for c in at.caption)
    assert figure(at, "Calls") == fmt.count(len(shown))


def test_filter_values_the_ledger_does_not_hold_are_dropped_before_the_page_reads_them(ledger: Ledger) -> None:
    # A session's filters outlive what they named (a pruned model, a tag key no call has now):
    # the widgets would drop them silently, but the page reads the filters before they are drawn.
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["filter_models"] = ["deepseek-v4-pro", "deepseek-retired"]
    at.session_state["filter_tag_key"] = "colour"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    selection = _default_selection()
    pro = [r for r in _in_range(ledger.records, selection.start, selection.end) if r.model == "deepseek-v4-pro"]
    assert figure(at, "Calls") == fmt.count(len(pro))
    assert at.multiselect(key="filter_models").value == ["deepseek-v4-pro"]
    assert at.selectbox(key="filter_tag_key").value == ""


# -- Empty and unreachable ledgers ------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES[:3])
def test_an_empty_ledger_explains_how_to_start_metering(page: str, sqlite_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSMETER_DATABASE_URL", sqlite_url)  # no file yet: nothing recorded
    at = _page(page)
    text = " ".join(m.value for m in at.markdown) + " ".join(i.value for i in at.info)
    assert "Nothing has been metered" in text and "dsmeter demo" in text
    assert not at.error
    assert at.date_input(key="filter_dates").value  # the filters are still drawn


def test_an_unreachable_database_is_one_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("DSMETER_DATABASE_URL", f"postgresql+psycopg://u:hunter2@127.0.0.1:{port}/x")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert len(at.error) == 1
    message = at.error[0].value
    assert "cannot read the ledger database" in message and "hunter2" not in message
    assert "\n" not in message


# -- What-if --------------------------------------------------------------------------------------


def _whatif_totals(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric if m.label.startswith("deepseek")}


def test_whatif_shows_the_guides_worked_example_at_list_prices_of_2026_04_25(sqlite_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSMETER_DATABASE_URL", sqlite_url)  # the planner needs no recorded calls
    at = _page("app_pages/whatif.py")
    at.date_input(key="whatif_day").set_value(date(2026, 4, 25))
    at.checkbox(key="whatif_list_prices").check()
    at.run()
    assert not at.exception
    assert _whatif_totals(at) == {"deepseek-v4-flash": "$168.00", "deepseek-v4-pro": "$1,682.00"}
    text = " ".join(str(df.value.to_dict()) for df in at.dataframe)
    for part in ("$56.00", "$28.00", "$84.00", "$290.00", "$348.00", "$1,044.00"):
        assert part in text


def test_whatif_guide_button_loads_the_guides_date_and_list_prices(sqlite_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSMETER_DATABASE_URL", sqlite_url)
    at = _page("app_pages/whatif.py")
    at.button(key="whatif_guide").click().run()
    assert _whatif_totals(at) == {"deepseek-v4-flash": "$168.00", "deepseek-v4-pro": "$1,682.00"}


def test_whatif_without_list_prices_shows_what_the_pro_promotion_billed(sqlite_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from collector.projection import Workload, estimate

    monkeypatch.setenv("DSMETER_DATABASE_URL", sqlite_url)
    at = _page("app_pages/whatif.py")
    at.date_input(key="whatif_day").set_value(date(2026, 4, 25)).run()
    expected = estimate(Workload(calls=1_000_000, cached_prompt_tokens=2000, uncached_prompt_tokens=200,
                                 output_tokens=300), data.price_book(), ["deepseek-v4-flash", "deepseek-v4-pro"],
                        datetime(2026, 4, 25, 12, tzinfo=timezone.utc))
    assert _whatif_totals(at) == {e.model: fmt.money(e.total, "USD") for e in expected}
    assert _whatif_totals(at)["deepseek-v4-pro"] != "$1,682.00"  # the 75% launch promotion applied
    assert any("Promotion applied" in c.value and "$1,682.00" in c.value for c in at.caption)


def test_whatif_replay_figures_are_the_projections_for_the_recorded_calls(ledger: Ledger) -> None:
    from collector.projection import compare_by_day, reprice_traffic

    at = _page("app_pages/whatif.py")
    at.selectbox(key="replay_model").set_value("deepseek-v4-pro")
    at.number_input(key="replay_days").set_value(10)
    at.slider(key="replay_shift").set_value(50)
    at.button[-1].click().run()  # the form's submit button
    assert not at.exception
    window = Selection(start=TODAY - timedelta(days=9), end=TODAY)
    frame = queries.traffic_frame(open_read_only(ledger.url), data.to_filters(window))
    summary = compare_by_day(reprice_traffic(frame, data.price_book(), as_model="deepseek-v4-pro",
                                             shift_off_peak=Decimal("0.5")), "USD")
    assert summary.calls == len(_in_range(ledger.records, window.start, window.end))
    assert _metric(at, "Actual, ") == fmt.money(summary.actual_cost, "USD")
    assert _metric(at, "Projected") == fmt.money(summary.projected_cost, "USD")
    assert summary.projected_cost != summary.actual_cost


# -- Prices ---------------------------------------------------------------------------------------


def test_prices_shows_the_tariffs_in_force_at_a_date_with_their_sources(sqlite_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSMETER_DATABASE_URL", sqlite_url)
    at = _page("app_pages/prices.py")
    at.date_input(key="prices_day").set_value(date(2026, 4, 25)).run()
    assert not at.exception
    table = at.dataframe[0].value
    book = data.price_book()
    moment = datetime(2026, 4, 25, NOW.hour, NOW.minute, tzinfo=timezone.utc)
    for model in ("deepseek-v4-flash", "deepseek-v4-pro"):
        tariff = book.resolve(model, moment).tariff
        rates = tariff.rates("standard", "USD")
        row = table[(table["model"] == model) & (table["currency"] == "USD")].iloc[0]
        assert (row["hit"], row["miss"], row["output"]) == (fmt.rate(rates.hit, "USD"), fmt.rate(rates.miss, "USD"),
                                                            fmt.rate(rates.output, "USD"))
        assert row["source"] == tariff.source and row["tariff"] == tariff.id
    pro = table[(table["model"] == "deepseek-v4-pro") & (table["currency"] == "USD")].iloc[0]
    assert pro["list_prices"] == "$0.145 / $1.74 / $3.48" and "75%" in pro["promotion"]


def test_prices_history_lists_every_entry_of_a_model_oldest_first(sqlite_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSMETER_DATABASE_URL", sqlite_url)
    at = _page("app_pages/prices.py")
    at.multiselect(key="prices_models").set_value(["deepseek-chat"]).run()
    history = at.dataframe[-1].value
    entries = data.price_book().tariffs_of("deepseek-chat")
    assert list(history["tariff"]) == [t.id for t in entries]
    assert list(history["start"]) == sorted(history["start"])


# -- Read-only --------------------------------------------------------------------------------------


def _ledger_state(url: str) -> tuple[object, ...]:
    """Every row of every table (and, for SQLite, the file's bytes): anything written changes it."""
    import hashlib

    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            tables = sorted(sa.inspect(connection).get_table_names())
            contents = []
            for table in tables:
                rows = connection.execute(sa.text(f'SELECT * FROM "{table}"')).all()
                contents.append((table, len(rows), hashlib.sha256(repr(sorted(map(repr, rows))).encode()).hexdigest()))
    finally:
        engine.dispose()
    file_digest = None
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        file_digest = hashlib.sha256(path.read_bytes()).hexdigest()
        wal = Path(f"{path}-wal")
        contents.append(("-wal bytes", wal.stat().st_size if wal.exists() else 0, ""))
    return tuple(contents), file_digest


def test_rendering_every_page_and_using_it_never_writes_to_the_ledger(ledger: Ledger) -> None:
    before = _ledger_state(ledger.url)
    at = _app(filter_statuses=["completed", "error"])
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.message for e in at.exception])
    at.switch_page("app_pages/calls.py").run()
    at.selectbox(key="calls_sort").set_value("duration_ms").run()
    at.switch_page("app_pages/chargeback.py").run()
    at.radio(key="chargeback_by").set_value(data.KEY_FINGERPRINT).run()
    at.radio(key="chargeback_by").set_value(data.END_USER).run()
    at.switch_page("app_pages/whatif.py").run()
    at.button[-1].click().run()
    assert not at.exception
    assert _ledger_state(ledger.url) == before
    assert ("calls", 600) in [(name, count) for name, count, _ in before[0]]  # the check saw the seeded rows


def test_a_database_lost_while_the_dashboard_runs_is_one_message_and_is_probed_again(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from conftest import _postgres_admin_url

    seed_through_writer(postgres_url, list(synthetic_records(50, seed=5, start=NOW - timedelta(days=3), end=NOW)))
    monkeypatch.setenv("DSMETER_DATABASE_URL", postgres_url)
    at = _app()
    assert figure(at, "Calls") == "50"
    admin_url = _postgres_admin_url()
    assert admin_url is not None
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:  # the database goes away under the running dashboard
        connection.execute(sa.text(f'DROP DATABASE "{make_url(postgres_url).database}" WITH (FORCE)'))
    admin.dispose()
    # The probe's "ready" is still cached; a new question goes to the database and fails.
    at.session_state["filter_models"] = ["deepseek-v4-pro"]
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert len(at.error) == 1 and at.error[0].value.startswith("lost the ledger database")
    assert "\n" not in at.error[0].value
    at.run()  # the next run does not trust the cached probe: it asks again and says why it cannot read
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith("cannot read the ledger database")
