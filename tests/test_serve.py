"""`painter serve` on a real local Ray with real Ray Serve, over real HTTP on 127.0.0.1: the pixels of
`painter generate`, who may do what, bad requests, decisions and `painter export-approved`."""
from __future__ import annotations

import base64
import csv
import json
import os

import pytest
import requests

from painter.cli import main as cli
from painter.io.output_table import OutputTable
from painter.io.reviews import ReviewTable
from serve_helpers import (DATE, NIGHT_SEED, TOKEN, TOKEN_VARIABLE, auth, prompts, serving)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(ray_session, tiny_model_dir, tmp_path_factory):
    yield from serving(tiny_model_dir, tmp_path_factory)


def test_served_images_are_the_nightly_jobs_bytes(served):
    url, table = served
    night = {(r["idx"], r["sample"]): r for r in OutputTable(table).read(DATE).to_pylist()}
    chosen = [p for p in prompts() if p[0] in ("p00", "p05", "xss", "../up/爬")]
    body = {"prompts": [{"idx": i, "text": t} for i, t, _ in chosen], "samples": 1, "seed": NIGHT_SEED}
    answer = requests.post(url + "/v1/images", json=body, headers=auth(), timeout=120)
    assert answer.status_code == 200, answer.text
    images = answer.json()["images"]
    assert [(im["idx"], im["sample"]) for im in images] == [(i, 0) for i, _, _ in chosen]
    for im in images:
        assert im["image_format"] == "png"
        assert base64.b64decode(im["image"]) == night[(im["idx"], im["sample"])]["image"]
    other = requests.post(url + "/v1/images", json=body | {"seed": NIGHT_SEED + 1}, headers=auth(), timeout=120)
    assert base64.b64decode(other.json()["images"][0]["image"]) != night[(chosen[0][0], 0)]["image"]


def test_every_route_but_healthz_needs_the_token(served):
    url, _ = served
    assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
    body = {"prompts": [{"idx": "a", "text": "宽松T恤"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        answer = requests.post(url + "/v1/images", json=body, headers=headers, timeout=30)
        assert answer.status_code == 401 and set(answer.json()) == {"error"}
        assert requests.get(url + f"/review/api/pictures?run_date={DATE}", headers=headers, timeout=30).status_code == 401
    login_form = requests.get(url + "/review/", timeout=30)
    assert 'name="token"' in login_form.text and "/review/api/" not in login_form.text
    assert requests.post(url + "/review/login", data={"token": "wrong"}, timeout=30).status_code == 401
    session = requests.Session()
    assert session.post(url + "/review/login", data={"token": TOKEN}, timeout=30).ok
    assert TOKEN not in str(session.cookies.get_dict())
    assert session.get(url + "/review/api/nights", timeout=30).json()["nights"] == [DATE]


@pytest.mark.parametrize("body, says", [
    ({"prompts": [{"idx": f"i{n}", "text": "宽松"} for n in range(65)]}, "at most 64"),
    ({"prompts": [{"idx": "a", "text": "宽松"}], "steps": 3}, "unknown option"),
    ({"prompts": [{"idx": "a", "text": "  "}]}, "non-empty"),
    ({"prompts": []}, "non-empty list"),
    ({"prompts": [{"idx": "a", "text": "宽松"}], "top_p": 1.5}, "top_p"),
    ({"prompts": [{"idx": "a", "text": "宽松"}], "image_format": "gif"}, "image_format"),
    ({"prompts": [{"idx": "a", "text": "宽松"}], "seed": "3"}, "seed must be an integer"),
])
def test_bad_requests_get_one_json_error(served, body, says):
    url, _ = served
    answer = requests.post(url + "/v1/images", json=body, headers=auth(), timeout=30)
    assert answer.status_code == 400
    assert set(answer.json()) == {"error"} and says in answer.json()["error"]


def test_a_body_that_is_not_json_is_a_400(served):
    url, _ = served
    answer = requests.post(url + "/v1/images", data=b"{not json", headers=auth(), timeout=30)
    assert answer.status_code == 400 and set(answer.json()) == {"error"}


def test_a_non_loopback_host_needs_a_token(tiny_model_dir, capsys, monkeypatch):
    code = cli.main(["serve", "--model", tiny_model_dir, "--host", "0.0.0.0"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code != 0 and last["status"] == "failed" and "--token" in last["error"]
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)  # a token, but a bad option: the token is never printed
    code = cli.main(["serve", "--model", tiny_model_dir, "--host", "0.0.0.0", "--token", f"env:{TOKEN_VARIABLE}",
                     "--replicas", "0"])
    out = capsys.readouterr()
    assert code != 0 and "--replicas" in out.out and TOKEN not in out.out + out.err


def test_newest_decision_wins_and_export_writes_the_approved(served, tmp_path):
    url, table = served
    decide = lambda pictures, decision, reason=None: requests.post(  # noqa: E731
        url + "/review/api/decisions", headers=auth(), timeout=60,
        json={"run_date": DATE, "decision": decision, "reason": reason, "reviewer": "ana",
              "pictures": [{"idx": i, "sample": 0} for i in pictures]})
    assert decide(["p10", "../up/爬"], "approve").json() == {"recorded": 2}
    assert decide(["p10"], "reject", "blurry").json() == {"recorded": 1}
    assert decide(["p11"], "reject").status_code == 400  # a rejection needs a reason
    assert decide(["nope"], "approve").status_code == 400  # not a picture of the night
    latest = {r["idx"]: r for r in ReviewTable(table).latest(DATE).to_pylist()}
    assert latest["p10"]["decision"] == "reject" and latest["p10"]["reason"] == "blurry"
    assert latest["../up/爬"]["decision"] == "approve" and latest["../up/爬"]["reviewer"] == "ana"
    rejected = requests.get(url + "/review/api/pictures", headers=auth(), timeout=60,
                            params={"run_date": DATE, "decision": "reject"}).json()
    assert [(r["idx"], r["reason"]) for r in rejected["items"]] == [("p10", "blurry")]
    out = tmp_path / "approved"
    assert cli.main(["export-approved", "--table", table, "--run-date", DATE, "--output", str(out)]) == 0
    files = sorted(os.listdir(out))
    assert files == ["..%2Fup%2F爬__0.png", "manifest.csv"]  # one file, in the folder: no path
    manifest = list(csv.DictReader((out / "manifest.csv").open(encoding="utf-8")))
    assert [(m["file"], m["idx"], m["reviewer"]) for m in manifest] == [(files[0], "../up/爬", "ana")]
    night = {r["idx"]: r["image"] for r in OutputTable(table).read(DATE).to_pylist()}
    assert (out / files[0]).read_bytes() == night["../up/爬"]
