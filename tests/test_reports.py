"""dsmeter report: figures from a ledger seeded through the real writer, against sums computed here."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from collector.cli import main
from collector.pricing import default_pricer
from collector.record import UsageRecord
from collector.rollups import attach, rebuild
from collector.store import LedgerStore
from collector.writer import LedgerWriter

DAY = date(2026, 10, 14)  # a Wednesday, not a Chinese holiday
# Off-peak USD prices per 1M tokens (cache hit, cache miss, output), written out from the published
# price list (shared/reference/deepseek-api-facts.md section 4), not read from the price book.
OFF_PEAK = {
    "deepseek-flash": (Decimal("0.003"), Decimal("0.15"), Decimal("0.60")),
    "deepseek-v4-pro": (Decimal("0.022"), Decimal("0.66"), Decimal("1.98")),
}
M = Decimal(1_000_000)


@dataclass
class Seeded:
    url: str
    records: list[UsageRecord]


def _record(rng: random.Random, day: date, team: str, model: str, status: str = "completed",
            tokens: bool = True) -> UsageRecord:
    # 11:00-15:59 UTC is 19:00-23:59 in Beijing: off-peak for every model on every day.
    started = datetime(day.year, day.month, day.day, 11, tzinfo=timezone.utc) + timedelta(
        seconds=rng.randrange(5 * 3600))
    hit, miss, out = rng.randrange(0, 50_000), rng.randrange(1, 8_000), rng.randrange(1, 3_000)
    return UsageRecord(
        started_at=started,
        finished_at=started + timedelta(seconds=2),
        requested_model=model,
        model=model if tokens else None,
        status=status,
        http_status=429 if not tokens else 200,
        prompt_tokens=hit + miss if tokens else None,
        prompt_cache_hit_tokens=hit if tokens else None,
        prompt_cache_miss_tokens=miss if tokens else None,
        completion_tokens=out if tokens else None,
        reasoning_tokens=out // 3 if tokens else None,
        usage_estimated=status == "cancelled",
        key_fingerprint=f"fp-{team}",
        # The body's end user; one call in three has none (taken from the time, so the random
        # sequence, and every other figure, stays as it was).
        user=None if started.second % 3 == 0 else f"user-{started.second % 4}",
        tags={"team": team, "env": "prod"},
    )


def _seed(url: str, seed: int = 1) -> list[UsageRecord]:
    rng = random.Random(seed)
    records: list[UsageRecord] = []
    for offset in range(14):  # 2026-10-01 .. 2026-10-14
        day = date(2026, 10, 1) + timedelta(days=offset)
        for _ in range(rng.randrange(5, 12)):
            records.append(_record(rng, day, rng.choice(["search", "ads"]),
                                   rng.choice(["deepseek-flash", "deepseek-flash", "deepseek-v4-pro"])))
    records += [_record(rng, DAY, "search", "deepseek-flash", status="error", tokens=False) for _ in range(3)]
    records += [_record(rng, DAY, "ads", "deepseek-v4-pro", status="cancelled") for _ in range(2)]
    records += [_record(rng, date(2026, 9, 30), "ads", "deepseek-flash")]  # last month: outside the MTD
    with LedgerWriter(url, pricer=default_pricer()) as writer:
        attach(writer, url)
        for record in records:
            writer.submit(record)
        assert writer.flush(60)
    return records


@pytest.fixture
def seeded(db_url: str) -> Iterator[Seeded]:
    LedgerStore(db_url).migrate()
    yield Seeded(db_url, _seed(db_url))


def _cost(r: UsageRecord) -> tuple[Decimal, Decimal, Decimal]:
    if r.completion_tokens is None or r.model is None:
        return Decimal(0), Decimal(0), Decimal(0)
    hit, miss, out = OFF_PEAK[r.model]
    assert r.prompt_cache_hit_tokens is not None and r.prompt_cache_miss_tokens is not None
    return r.prompt_cache_hit_tokens * hit / M, r.prompt_cache_miss_tokens * miss / M, r.completion_tokens * out / M


def _on(records: list[UsageRecord], first: date, last: date | None = None) -> list[UsageRecord]:
    last = last or first
    return [r for r in records if first <= r.started_at.date() <= last]


def _report(url: str, *args: str) -> Any:
    result = CliRunner().invoke(main, ["report", "--db", url, "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_day_report_totals_equal_sums_computed_from_the_seeded_calls(seeded: Seeded) -> None:
    report = _report(seeded.url, "--date", DAY.isoformat())
    day = _on(seeded.records, DAY)
    totals = report["totals"]
    assert totals["calls"] == len(day)
    assert totals["errors"] == 3 and totals["cancels"] == 2
    assert totals["tokens"] == {
        "cache_hit": sum(r.prompt_cache_hit_tokens or 0 for r in day),
        "cache_miss": sum(r.prompt_cache_miss_tokens or 0 for r in day),
        "output": sum(r.completion_tokens or 0 for r in day),
        "reasoning": sum(r.reasoning_tokens or 0 for r in day),
    }
    parts = [_cost(r) for r in day]
    hit, miss, out = (sum((p[i] for p in parts), Decimal(0)) for i in range(3))
    cost = totals["cost"]["USD"]
    assert [Decimal(cost[k]) for k in ("cache_hit", "cache_miss", "output", "total")] == [hit, miss, out,
                                                                                       hit + miss + out]
    saved = sum(((r.prompt_cache_hit_tokens or 0) * (OFF_PEAK[r.model][1] - OFF_PEAK[r.model][0]) / M
                 for r in day if r.model), Decimal(0))
    assert Decimal(totals["cache_saved"]["USD"]) == saved.quantize(Decimal("0.000001"))
    prompt = totals["tokens"]["cache_hit"] + totals["tokens"]["cache_miss"]
    assert totals["cache_hit_ratio"] == round(totals["tokens"]["cache_hit"] / prompt, 6)
    previous = _on(seeded.records, DAY - timedelta(days=1))
    assert report["previous_totals"]["calls"] == len(previous)
    assert Decimal(report["previous_totals"]["cost"]["USD"]["total"]) == sum(
        (sum(_cost(r), Decimal(0)) for r in previous), Decimal(0))


def test_breakdown_by_model_and_team_with_change_against_the_previous_day(seeded: Seeded) -> None:
    report = _report(seeded.url, "--date", DAY.isoformat(), "--group-by", "model,tag:team")
    rows = report["breakdown"]["rows"]
    assert report["breakdown"]["by"] == ["model", "tag:team"]

    def expected(day: date) -> dict[tuple[str, str], Decimal]:
        out: dict[tuple[str, str], Decimal] = {}
        for r in _on(seeded.records, day):
            if r.model is None:
                continue
            key = (r.model, r.tags["team"])
            out[key] = out.get(key, Decimal(0)) + sum(_cost(r), Decimal(0))
        return out

    now, before = expected(DAY), expected(DAY - timedelta(days=1))
    priced = {(row["groups"]["model"], row["groups"]["tag:team"]): row for row in rows if row["currency"] == "USD"}
    assert {k: Decimal(v["cost"]) for k, v in priced.items()} == {k: now.get(k, Decimal(0))
                                                                   for k in set(now) | set(before)}
    for key, row in priced.items():
        assert Decimal(row["previous_cost"]) == before.get(key, Decimal(0))
        assert Decimal(row["change"]) == now.get(key, Decimal(0)) - before.get(key, Decimal(0))
    costs = [Decimal(row["cost"]) for row in rows if row["currency"] == "USD"]
    assert costs == sorted(costs, reverse=True)


def test_breakdown_and_top_spenders_by_end_user_are_the_hand_sums_with_the_rollup_built(seeded: Seeded) -> None:
    # Reports read the rollup, which keeps no end user: a user grouping must come from the ledger.
    rebuild(LedgerStore(seeded.url))
    report = _report(seeded.url, "--date", DAY.isoformat(), "--period", "week", "--group-by", "user",
                     "--top-by", "user", "--top", "3")

    def spend(first: date, last: date) -> dict[str | None, Decimal]:
        out: dict[str | None, Decimal] = {}
        for r in _on(seeded.records, first, last):
            if r.completion_tokens is not None and r.model is not None:
                out[r.user] = out.get(r.user, Decimal(0)) + sum(_cost(r), Decimal(0))
        return out

    now, before = spend(date(2026, 10, 8), DAY), spend(date(2026, 10, 1), date(2026, 10, 7))
    assert None in now and len(now) >= 3  # calls with and without a user, several users
    rows = {row["groups"]["user"]: row for row in report["breakdown"]["rows"] if row["currency"] == "USD"}
    assert {user: Decimal(row["cost"]) for user, row in rows.items()} == {
        user: now.get(user, Decimal(0)) for user in set(now) | set(before)}
    assert {user: Decimal(row["previous_cost"]) for user, row in rows.items()} == {
        user: before.get(user, Decimal(0)) for user in set(now) | set(before)}
    assert report["top_spenders"]["by"] == "user"
    top = [(row["group"], Decimal(row["cost"])) for row in report["top_spenders"]["rows"] if row["currency"] == "USD"]
    assert top == sorted(now.items(), key=lambda item: -item[1])[:3]


def test_week_and_month_periods_and_their_previous_periods(seeded: Seeded) -> None:
    week = _report(seeded.url, "--date", DAY.isoformat(), "--period", "week")
    assert (week["period"]["first"], week["period"]["last"]) == ("2026-10-08", "2026-10-14")
    assert (week["previous_period"]["first"], week["previous_period"]["last"]) == ("2026-10-01", "2026-10-07")
    assert week["totals"]["calls"] == len(_on(seeded.records, date(2026, 10, 8), DAY))
    assert week["previous_totals"]["calls"] == len(_on(seeded.records, date(2026, 10, 1), date(2026, 10, 7)))
    assert [d["day"] for d in week["daily"]] == [f"2026-10-{d:02d}" for d in range(8, 15)]
    month = _report(seeded.url, "--date", DAY.isoformat(), "--period", "month")
    assert (month["period"]["first"], month["previous_period"]["first"], month["previous_period"]["last"]) == (
        "2026-10-01", "2026-09-01", "2026-09-14")
    assert month["previous_totals"]["calls"] == 0  # the 30 September call is after the 14th


def test_month_to_date_and_forecast_from_the_last_seven_days(seeded: Seeded) -> None:
    report = _report(seeded.url, "--date", DAY.isoformat())
    [month] = report["month"]
    cost = {r.request_id: sum(_cost(r), Decimal(0)) for r in seeded.records}
    mtd = sum((cost[r.request_id] for r in _on(seeded.records, date(2026, 10, 1), DAY)), Decimal(0))
    week = sum((cost[r.request_id] for r in _on(seeded.records, date(2026, 10, 8), DAY)), Decimal(0))
    rate = (week / 7).quantize(Decimal("0.000001"))
    assert Decimal(month["month_to_date"]) == mtd
    assert Decimal(month["run_rate_per_day"]) == rate
    assert Decimal(month["forecast"]) == mtd + rate * 17  # 15..31 October


def test_the_same_report_twice_is_the_same_bytes_in_every_format(seeded: Seeded, tmp_path: Path) -> None:
    for fmt in ("md", "csv", "json", "html"):
        outputs = []
        for run in range(2):
            path = tmp_path / f"{fmt}-{run}"
            result = CliRunner().invoke(main, ["report", "--db", seeded.url, "--date", DAY.isoformat(), "--format",
                                               fmt, "--group-by", "model,tag:team", "--output", str(path)])
            assert result.exit_code == 0, result.output
            outputs.append(path.read_bytes())
        assert outputs[0] == outputs[1], fmt
        assert b"generated" not in outputs[0].lower()


def test_stamp_adds_generated_at_in_the_header_and_nowhere_else(seeded: Seeded) -> None:
    plain = CliRunner().invoke(main, ["report", "--db", seeded.url, "--date", DAY.isoformat()]).stdout
    stamped = CliRunner().invoke(main, ["report", "--db", seeded.url, "--date", DAY.isoformat(), "--stamp"]).stdout
    lines = stamped.splitlines()
    assert lines[2].startswith("Generated at: 20")
    assert "\n".join(lines[:2] + lines[4:]) + "\n" == plain


def test_html_report_is_one_self_contained_file_with_svg_charts(seeded: Seeded, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", "--db", seeded.url, "--date", DAY.isoformat(), "--period", "week",
                                       "--format", "html", "--group-by", "tag:team", "--output", str(path)])
    assert result.exit_code == 0, result.output
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count("<svg") >= 2 and "<style>" in html
    for fetch in ("<script", "<link", "src=", "@import", "url("):
        assert fetch not in html
    bare = html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace name, never fetched
    assert "http://" not in bare and "https://" not in bare


def test_a_time_zone_moves_the_day_boundaries(seeded: Seeded) -> None:
    # In UTC+14 the local 15 October runs from 10:00 UTC on the 14th to 10:00 UTC on the 15th.
    report = _report(seeded.url, "--date", "2026-10-15", "--tz", "Pacific/Kiritimati")
    start = datetime(2026, 10, 14, 10, tzinfo=timezone.utc)
    expected = [r for r in seeded.records if start <= r.started_at < start + timedelta(days=1)]
    assert report["totals"]["calls"] == len(expected)
    assert report["period"]["since"] == "2026-10-14T10:00:00+00:00"


def test_tag_filter_limits_the_report(seeded: Seeded) -> None:
    report = _report(seeded.url, "--date", DAY.isoformat(), "--tag", "team=ads")
    assert report["totals"]["calls"] == len([r for r in _on(seeded.records, DAY) if r.tags["team"] == "ads"])


@pytest.mark.parametrize(("args", "fragment"), [
    (["--date", "14/10/2026"], "unknown date"),
    (["--date", "2026-02-30"], "unknown date"),
    (["--group-by", "tag:tema"], "no call carries tag key 'tema'"),
    (["--group-by", "colour"], "cannot group by 'colour'"),
    (["--tz", "Mars/Olympus"], "unknown time zone"),
    (["--tag", "team"], "key=value"),
    (["--notify", "ftp://example.com/x"], "http:// or https://"),
])
def test_bad_input_is_one_line_and_exit_2(seeded: Seeded, args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(main, ["report", "--db", seeded.url, *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_a_missing_ledger_is_exit_3(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", "--db", f"sqlite:///{tmp_path / 'none.db'}", "--date", "2026-10-14"])
    assert result.exit_code == 3 and "no ledger" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_an_empty_or_older_database_is_exit_3_with_what_to_do(tmp_path: Path, db_url: str) -> None:
    import sqlite3

    from alembic import command

    from collector.store import alembic_config

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    result = CliRunner().invoke(main, ["report", "--db", f"sqlite:///{empty}", "--date", "2026-10-14"])
    assert result.exit_code == 3 and "dsmeter db upgrade" in result.stderr and result.stderr.count("\n") == 1
    command.upgrade(alembic_config(db_url), "0002")  # a ledger from before the reporting tables
    result = CliRunner().invoke(main, ["report", "--db", db_url, "--date", "2026-10-14"])
    assert result.exit_code == 3 and "dsmeter db upgrade" in result.stderr and "Traceback" not in result.output


class _Hook(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.headers["Content-Type"], body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []
    handler = type("Hook", (_Hook,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/T000/secret-path", received
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_notify_posts_slack_text_and_the_report(seeded: Seeded,
                                                webhook: tuple[str, list[tuple[str, bytes]]]) -> None:
    url, received = webhook
    result = CliRunner().invoke(main, ["report", "--db", seeded.url, "--date", DAY.isoformat(), "--notify", url])
    assert result.exit_code == 0, result.output
    [(content_type, body)] = received
    payload = json.loads(body)
    assert content_type.startswith("application/json")
    assert payload["text"].startswith("*DeepSeek spend, day of 2026-10-14*")
    assert payload["report"]["totals"]["calls"] == len(_on(seeded.records, DAY))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_webhook_is_exit_6_after_the_report_is_written(seeded: Seeded, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/hooks/secret-token"
    out = tmp_path / "r.md"
    result = CliRunner().invoke(main, ["report", "--db", seeded.url, "--date", DAY.isoformat(), "--output", str(out),
                                       "--notify", url])
    assert result.exit_code == 6
    assert out.read_text().startswith("# DeepSeek spend, day of 2026-10-14")
    assert result.stderr.count("\n") == 1 and "unreachable" in result.stderr and "secret-token" not in result.stderr
    to_stdout = CliRunner().invoke(main, ["report", "--db", seeded.url, "--date", DAY.isoformat(), "--notify", url])
    assert to_stdout.exit_code == 6 and to_stdout.stdout.startswith("# DeepSeek spend")


def test_report_reads_the_rollup_and_the_raw_ledger_alike(seeded: Seeded) -> None:
    from collector.queries import Filters, uses_rollup
    from collector.reports import build_report

    store = LedgerStore(seeded.url)
    assert uses_rollup(store.engine, Filters())
    rolled = build_report(store.engine, day=DAY, period="month", group_by=["model", "tag:team"])
    with store.engine.begin() as connection:  # the same ledger, with the rollup switched off
        from collector.reporting_schema import ROLLUP_STATE

        connection.execute(ROLLUP_STATE.update().values(complete=False))
    raw = build_report(store.engine, day=DAY, period="month", group_by=["model", "tag:team"])
    assert (rolled.source, raw.source) == ("rollup", "ledger")
    assert rolled.totals.calls == raw.totals.calls
    assert (rolled.breakdown, rolled.daily, rolled.month, rolled.top_spenders) == (
        raw.breakdown, raw.daily, raw.month, raw.top_spenders)
    assert rolled.totals.cost == raw.totals.cost and rolled.totals.cache_saved == raw.totals.cache_saved
    store.close()
