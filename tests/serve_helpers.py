"""Shared by the serve tests: a generated night, `painter serve` started on the test's Ray, HTTP helpers."""
from __future__ import annotations

import os
import socket
import time

import requests

from painter.stages import generate, serve

DATE = "2024-05-01"
TOKEN = "t0ken-for-tests-" + "x" * 16
TOKEN_VARIABLE = "PAINTER_TEST_SERVE_TOKEN"
XSS = "<script>alert(1)</script>"
NIGHT_SEED = 3


def prompts(n: int = 30) -> list[tuple[str, str, str]]:
    """(idx, text, category): Chinese captions, one that is markup, one idx that looks like a path."""
    rows = [(f"p{i:02d}", f"宽松T恤 第{i}款", "shoes" if i % 2 else "hats") for i in range(n - 2)]
    return rows + [("xss", XSS, "hats"), ("../up/爬", "白色背景中间的一个大的红色圆形", "shoes")]


def generate_night(model_dir: str, folder) -> str:
    """A night of the prompts (1 sample each) in a fresh output table under `folder`; its root."""
    path = folder / "prompts.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in prompts()), encoding="utf-8")
    output = str(folder / "table")
    generate.run(generate.Options(input=[str(path)], model=model_dir, output=output, run_date=DATE,
                                  contact_sheet=False, input_schema="idx:str:1,text:str:1,category:str:1",
                                  partition_by=["category"], seed=NIGHT_SEED))
    return output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, seconds: float = 120.0, what: str = "condition"):
    """Poll `condition()` until it returns something truthy (returned) or the deadline passes."""
    deadline = time.time() + seconds
    while True:
        try:
            value = condition()
            if value:
                return value
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise AssertionError(f"{what} not met within {seconds} s")
        time.sleep(0.2)


def start_serving(model_dir: str, table: str | None) -> str:
    """`painter serve` with a token (from an environment variable) on a free loopback port; its URL."""
    os.environ[TOKEN_VARIABLE] = TOKEN
    options = serve.Options(model=model_dir, table=table, port=free_port(), token=f"env:{TOKEN_VARIABLE}",
                            num_cpus=0.25)
    url = serve.start(options)["url"]
    wait_until(lambda: requests.get(url + "/healthz", timeout=5).ok, what="/healthz answering")
    return url


def stop_serving() -> None:
    from ray import serve as ray_serve

    ray_serve.shutdown()


def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def serving(model_dir: str, tmp_path_factory):
    """A module's `served` fixture: a generated night of `model_dir` served on Ray; yields (url, table root)."""
    table = generate_night(model_dir, tmp_path_factory.mktemp("night"))
    url = start_serving(model_dir, table)
    yield url, table
    stop_serving()
