"""The serve engine's batching, without Ray or a model: a batch is made when the engine is free, from the
requests that waited meanwhile, in whole micro-batches of rows (`painter.stages.serve_app`, "Batching")."""
from __future__ import annotations

import asyncio
import time
from collections import deque

from painter.stages.serve_app import Engine


def engine(micro_batch: int = 8, max_batch_requests: int = 16, seconds: float = 0.05, fail_on: str | None = None):
    """An Engine whose model call only records the rows of each batch (and takes `seconds`)."""
    engine = Engine.func_or_class.__new__(Engine.func_or_class)
    engine.micro_batch, engine.max_batch_requests, engine.batch_wait_s = micro_batch, max_batch_requests, 0.01
    engine.waiting, engine.arrived, engine.batcher = deque(), None, None
    engine.batches = []

    def run(jobs):
        engine.batches.append(sum(len(rows["idx"]) for _, rows in jobs))
        time.sleep(seconds)
        if any(fail_on in rows["idx"] for _, rows in jobs):
            raise RuntimeError("the model failed")
        return [{"images": list(rows["idx"])} for _, rows in jobs]
    engine._run = run
    return engine


def job(name: str, rows: int = 1) -> tuple:
    return None, {"idx": [f"{name}.{n}" for n in range(rows)]}


def test_waiting_requests_go_in_one_batch_up_to_max_batch_requests():
    e = engine()

    async def main():
        return await asyncio.gather(*(e.generate(job(f"r{n}")) for n in range(20)))
    answers = asyncio.run(main())
    assert [a["images"] for a in answers] == [[f"r{n}.0"] for n in range(20)]
    assert e.batches == [16, 4]


def test_requests_that_arrive_while_the_engine_runs_make_the_next_batch_in_whole_micro_batches():
    e = engine(seconds=0.2)

    async def main():
        first = asyncio.ensure_future(e.generate(job("first")))
        await asyncio.sleep(0.1)  # the engine is computing the first request alone
        rest = [e.generate(job(f"r{n}")) for n in range(11)]
        return await asyncio.gather(first, *rest)
    answers = asyncio.run(main())
    assert len(answers) == 12
    assert e.batches == [1, 8, 3]  # not 11 rows in 2 micro-batches with 5 padding rows


def test_a_request_is_never_split():
    e = engine()

    async def main():
        return await asyncio.gather(e.generate(job("a", 5)), e.generate(job("b", 5)), e.generate(job("c", 20)))
    answers = asyncio.run(main())
    assert [len(a["images"]) for a in answers] == [5, 5, 20]
    assert e.batches == [30]  # 4 micro-batches (10 rows, then 20, would need 5)


def test_a_failed_batch_fails_its_requests_only():
    e = engine(fail_on="bad.0", max_batch_requests=1)

    async def main():
        return await asyncio.gather(e.generate(job("bad")), e.generate(job("good")), return_exceptions=True)
    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and good == {"images": ["good.0"]}


def test_a_cancelled_request_is_not_computed():
    e = engine(seconds=0.2)

    async def main():
        first = asyncio.ensure_future(e.generate(job("first")))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(e.generate(job("gone")))
        kept = asyncio.ensure_future(e.generate(job("kept")))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await asyncio.gather(first, kept)
    asyncio.run(main())
    assert e.batches == [1, 1]
