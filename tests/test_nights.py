"""Nightly runs of generate: --run-date words and ranges in a --timezone, {run_date} paths, backfills.

The pure parts (`painter.io.run_dates`) are checked at fixed instants; the backfill runs `painter generate`
through the CLI on the session's local Ray: three nights with dated input and TSV paths, then the same
command again (nothing new), then a night whose input is missing (stops the rest, or not with --keep-going).
"""
from __future__ import annotations

import json
from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest
from deltalake import DeltaTable

from painter.cli import main as cli
from painter.errors import InputError
from painter.io.run_dates import fill, nights
from painter.stages.generate import Options
from painter.stages.nights import for_night

# 2026-12-07 20:30 UTC: already the 8th in Shanghai (UTC+8), still the 7th in New York (UTC-5)
EVENING = datetime(2026, 12, 7, 20, 30, tzinfo=ZoneInfo("UTC"))


def test_today_and_yesterday_are_dates_in_the_time_zone():
    assert nights("today", "UTC", EVENING) == [date(2026, 12, 7)]
    assert nights(None, "Asia/Shanghai", EVENING) == [date(2026, 12, 8)]
    assert nights("yesterday", "Asia/Shanghai", EVENING) == [date(2026, 12, 7)]
    assert nights("yesterday", "America/New_York", EVENING) == [date(2026, 12, 6)]
    assert nights("2026-02-28", "Asia/Shanghai", EVENING) == [date(2026, 2, 28)]


def test_ranges_are_inclusive_and_may_use_words():
    assert nights("2026-12-01..2026-12-03", "UTC", EVENING) == [date(2026, 12, d) for d in (1, 2, 3)]
    assert nights("2026-12-05..yesterday", "UTC", EVENING) == [date(2026, 12, 5), date(2026, 12, 6)]
    assert nights("2026-12-07..2026-12-07", "UTC", EVENING) == [date(2026, 12, 7)]


@pytest.mark.parametrize("spec, timezone, says", [
    ("2026-13-01", "UTC", "--run-date '2026-13-01'"), ("tomorrow", "UTC", "expected today, yesterday"),
    ("2026-12-03..2026-12-01", "UTC", "ends before it starts"), ("2025-01-01..2026-12-01", "UTC", "at most 366"),
    ("today", "Mars/Olympus", "--timezone 'Mars/Olympus'")])
def test_bad_run_dates_and_zones_are_usage_errors(spec, timezone, says):
    with pytest.raises(InputError, match=says.replace("(", r"\(").replace(".", r"\.")) as raised:
        nights(spec, timezone, EVENING)
    assert raised.value.failure == "usage"


def test_paths_are_filled_from_the_night():
    night = date(2026, 12, 1)
    assert fill("s3://b/in/{run_date}/*.tsv", night) == "s3://b/in/2026-12-01/*.tsv"
    assert fill("/in/{run_date:%Y/%m/%d}/p.tsv", night) == "/in/2026/12/01/p.tsv"
    assert fill("/in/{a,b}/{run_date:%Y%m%d}.tsv", night) == "/in/{a,b}/20261201.tsv"  # a glob's braces stay
    assert fill(None, night) is None
    options = for_night(Options(input=["/in/{run_date}.tsv"], model="m", output="/out/{run_date:%Y}",
                                tsv_output="/tsv/{run_date}.tsv", run_date="2026-12-01..2026-12-02"), night)
    assert (options.input, options.output, options.tsv_output, options.run_date) == (
        ["/in/2026-12-01.tsv"], "/out/2026", "/tsv/2026-12-01.tsv", "2026-12-01")


def _painter(*args: str, capsys) -> tuple[int, dict]:
    code = cli.main(["generate", *args])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_today_in_the_time_zone_names_the_partition(ray_session, tiny_model_dir, tmp_path, capsys):
    """No --run-date: the night is today's date in --timezone (Kiritimati is UTC+14, so it is never UTC's
    date only in the hours before 10:00 UTC; compare with the zone's date itself, read around the run)."""
    (tmp_path / "in").mkdir()
    before = datetime.now(ZoneInfo("Pacific/Kiritimati")).date()
    for day in {before, datetime.now(ZoneInfo("Pacific/Kiritimati")).date()}:
        (tmp_path / "in" / f"{day}.tsv").write_text("a\t红色连衣裙\n", encoding="utf-8")
    code, summary = _painter("--input", str(tmp_path / "in" / "{run_date}.tsv"), "--model", tiny_model_dir,
                             "--output", str(tmp_path / "out"), "--timezone", "Pacific/Kiritimati",
                             "--no-contact-sheet", capsys=capsys)
    after = datetime.now(ZoneInfo("Pacific/Kiritimati")).date()
    assert code == 0 and summary["run_date"] in {before.isoformat(), after.isoformat()}, summary
    assert DeltaTable(str(tmp_path / "out")).to_pyarrow_table(columns=["run_date"]).column(0).to_pylist() == [
        summary["run_date"]]


@pytest.mark.slow
def test_backfill_runs_each_night_once(ray_session, tiny_model_dir, tmp_path, capsys):
    days = ["2026-12-01", "2026-12-02", "2026-12-03"]
    for i, day in enumerate(days):  # input/2026/12/0d/prompts.tsv: i + 1 prompts on night i
        folder = tmp_path / "input" / day.replace("-", "/")
        folder.mkdir(parents=True)
        (folder / "prompts.tsv").write_text("".join(f"{day}-{k}\t宽松T恤 {k}\n" for k in range(i + 1)),
                                            encoding="utf-8")
    output = str(tmp_path / "out")
    args = ["--input", str(tmp_path / "input" / "{run_date:%Y/%m/%d}" / "prompts.tsv"), "--model", tiny_model_dir,
            "--output", output, "--tsv-output", str(tmp_path / "tsv" / "{run_date}.tsv"), "--no-contact-sheet",
            "--run-date", f"{days[0]}..{days[-1]}"]
    code, summary = _painter(*args, capsys=capsys)
    assert code == 0 and summary["status"] == "succeeded", summary
    assert [n["run_date"] for n in summary["nights"]] == summary["run_dates"] == days
    assert [n["images_out"] for n in summary["nights"]] == [1, 2, 3]
    assert all(n["status"] == "succeeded" for n in summary["nights"])
    rows = DeltaTable(output).to_pyarrow_table(columns=["idx", "run_date"]).to_pylist()
    assert sorted((r["run_date"], r["idx"]) for r in rows) == sorted(
        (day, f"{day}-{k}") for i, day in enumerate(days) for k in range(i + 1))
    assert [len((tmp_path / "tsv" / f"{d}.tsv").read_text().splitlines()) for d in days] == [1, 2, 3]
    version = DeltaTable(output).version()

    code, again = _painter(*args, capsys=capsys)  # the same backfill again: nothing new anywhere
    assert code == 0 and [n["images_out"] for n in again["nights"]] == [0, 0, 0], again
    assert [n["skipped_already_done"] for n in again["nights"]] == [1, 2, 3]
    assert DeltaTable(output).version() == version

    (tmp_path / "input" / "2026" / "12" / "02" / "prompts.tsv").unlink()  # night 2's input never came
    args[-1] = "2026-12-02..2026-12-04"
    code, failed = _painter(*args, capsys=capsys)
    assert (code, failed["status"], failed["failure"]) == (2, "failed", "usage"), failed
    assert [n["status"] for n in failed["nights"]] == ["failed"] and "2026/12/02" in failed["nights"][0]["error"]
    assert failed["nights_not_run"] == ["2026-12-03", "2026-12-04"]
    code, going = _painter(*args, "--keep-going", capsys=capsys)
    assert (code, going["failure"], going["nights_failed"]) == (2, "usage", 2), going  # the 4th has no input either
    assert [n["status"] for n in going["nights"]] == ["failed", "succeeded", "failed"]
    assert going["nights"][1]["skipped_already_done"] == 3 and going["nights_not_run"] == []
