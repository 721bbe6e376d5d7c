"""The Ray Serve application of `painter serve`: an `Engine` deployment that owns the model and batches
requests, and an `Ingress` deployment (FastAPI) for `/v1/images`, `/healthz` and the review page.

Pixels: a request's sampling options become a `GenerationConfig` through the generate job's own
`generation_config` (the server's precision and pixel rounding, the request's seed and sampling), and
the engine runs the same `Generator` at the same fixed micro-batch, so (seed, idx, sample) gives the
bytes `painter generate` writes. Rows of concurrent requests with the same settings are generated in one
`Generator` call (images do not depend on their batch-mates).

Threads: on CPU the engine computes on one torch thread, whatever `--num-cpus` (Ray would give it that
many): the VQGAN decode's pixels differ by 1 here and there between 1 and 2 threads (oneDNN splits its
sums by thread), and `painter generate`'s actors (0.5 CPU each, `painter.stages.resources`) compute on
one. One thread is also no slower for a small model, whose decoding is mostly Python; it leaves the other
cores to the HTTP proxy and the ingress. More throughput on CPU comes from `--replicas`.

Batching: the engine keeps its own queue and makes the next batch only when it is free, from the requests
that waited meanwhile (at most `max_batch_requests`), in whole micro-batches of rows while more than one
micro-batch waits: the rest go first next time, with what arrives meanwhile, rather than into a padded
micro-batch now (the model computes a micro-batch of 8 rows in the time of 8 whether it holds 1 row or 8).
A lone request waits up to `batch_wait_s` for a micro-batch's worth of company. Not `@serve.batch`: in
Ray 2.60 (since `max_concurrent_batches`, ray-project/ray#53096) it cuts the next batch while the previous
one still runs, from whatever arrived within `batch_wait_timeout_s`, so under load batches of 1-3
requests queued behind each other, each computing a whole padded micro-batch (benchmarks/serve.py
measured 0.14x in-process that way).

Who may do what: with a token (held here only as its SHA-256) every route but `/healthz` needs
`Authorization: Bearer <token>` or the session cookie the login form sets (an HMAC of the token's
digest, HttpOnly, SameSite=Strict). Bad requests answer 4xx with one JSON `{"error": ...}` and never
reach the engine.
"""

import asyncio
import base64
import dataclasses
import hashlib
import hmac
from collections import OrderedDict, deque
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from ray import serve

from painter.errors import InputError, PainterError
from painter.io import review_pages
from painter.io.images import IMAGE_FORMATS
from painter.io.output_table import OutputTable
from painter.io.reviews import ReviewTable
from painter.io.sheet import MIME, packaged_font_path
from painter.stages import generate

REQUEST_FIELDS = ("prompts", "samples", "seed", "top_k", "top_p", "temperature", "guidance", "image_format")
NUMBERS = {"seed": int, "top_k": int, "samples": int, "temperature": float, "top_p": float, "guidance": float}
COOKIE = "painter_session"
GENERATORS_KEPT = 8
CPU_THREADS = 1  # torch threads of a CPU engine: those of painter generate's actors (see the module docstring)
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "review"  # the page and its login form
app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def token_digest(token: str | None) -> str | None:
    return hashlib.sha256(token.encode("utf-8")).hexdigest() if token else None


def session_value(digest: str) -> str:
    return hmac.new(digest.encode("ascii"), b"painter-review-session", hashlib.sha256).hexdigest()


def _number(body: dict, name: str):
    value = body[name]
    if value is None and name in ("top_p", "guidance"):
        return None
    kind = NUMBERS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InputError(f"{name} must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _prompts(prompts) -> tuple[list[str], list[str]]:
    if not isinstance(prompts, list) or not prompts:
        raise InputError("prompts must be a non-empty list of {\"idx\", \"text\"} objects")
    idxs, texts = [], []
    for n, prompt in enumerate(prompts):
        if not isinstance(prompt, dict) or set(prompt) != {"idx", "text"}:
            raise InputError(f"prompts[{n}] must be an object with exactly idx and text")
        idx, text = prompt["idx"], prompt["text"]
        if not isinstance(idx, str) or not idx or not isinstance(text, str) or not text.strip():
            raise InputError(f"prompts[{n}]: idx and text must be non-empty strings")
        idxs.append(idx)
        texts.append(text)
    if len(set(idxs)) != len(idxs):
        raise InputError("prompts: an idx is given twice")
    return idxs, texts


def parse_request(body, base: generate.Options, max_images: int) -> tuple:
    """(GenerationConfig, rows) of a `/v1/images` body, or InputError saying what is wrong."""
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise InputError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(REQUEST_FIELDS)}")
    idxs, texts = _prompts(body.get("prompts"))
    values = {name: _number(body, name) for name in NUMBERS if name in body}
    samples = values.pop("samples", 1)
    if samples < 1 or samples * len(idxs) > max_images:
        raise InputError(f"samples must be at least 1 and prompts x samples at most {max_images}")
    if "image_format" in body and body["image_format"] not in IMAGE_FORMATS:
        raise InputError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}")
    options = dataclasses.replace(base, samples=samples, image_format=body.get("image_format", base.image_format),
                                  **values)
    config = generate.generation_config(options)  # the nightly job's own config from its options
    rows = {"idx": [i for i in idxs for _ in range(samples)], "text": [t for t in texts for _ in range(samples)],
            "sample": [s for _ in idxs for s in range(samples)]}
    return config, rows


@serve.deployment
class Engine:
    """One loaded model; `generate` takes one request's rows and config, batched with others' (see the module
    docstring: the batch is made when the engine is free, in whole micro-batches)."""

    def __init__(self, model: str, micro_batch: int | None, storage_options: dict | None,
                 max_batch_requests: int, batch_wait_s: float):
        from painter.checkpoint.model_dir import load_model
        from painter.inference.generator import default_micro_batch
        from painter.io.storage import Storage
        from painter.runtime import pick_device

        self.device = pick_device(None)
        if self.device.type == "cpu":
            import torch

            torch.set_num_threads(CPU_THREADS)
        self.model = load_model(model, device=self.device, storage=Storage(storage_options))
        self.micro_batch = micro_batch or default_micro_batch(self.device)
        self.generators: OrderedDict = OrderedDict()
        self.max_batch_requests, self.batch_wait_s = max_batch_requests, batch_wait_s
        self.waiting: deque = deque()  # (job, future) in arrival order
        self.arrived: asyncio.Event | None = None  # made on the replica's event loop, with the batcher
        self.batcher: asyncio.Task | None = None

    def _generator(self, config):
        from painter.inference.generator import Generator

        key = repr(config)
        if key not in self.generators:
            self.generators[key] = Generator(self.model, config, self.device, micro_batch=self.micro_batch)
            while len(self.generators) > GENERATORS_KEPT:
                self.generators.popitem(last=False)
        self.generators.move_to_end(key)
        return self.generators[key]

    def _run(self, jobs: list[tuple]) -> list[dict]:
        groups: dict[str, list[int]] = {}
        for n, (config, _) in enumerate(jobs):
            groups.setdefault(repr(config), []).append(n)
        results: list[dict] = [{} for _ in jobs]
        for members in groups.values():
            config = jobs[members[0]][0]
            batch = {c: [v for n in members for v in jobs[n][1][c]] for c in ("idx", "text", "sample")}
            images = list(self._generator(config)(batch)[config.image_format])
            for n in members:
                count = self._rows(jobs[n])
                results[n] = {"images": images[:count], "model": self.model.fingerprint}
                images = images[count:]
        return results

    async def generate(self, job: tuple) -> dict:
        """{"images", "model"} for one request's (config, rows), computed in a batch with other requests'."""
        if self.batcher is None or self.batcher.done():
            self.arrived = asyncio.Event()
            self.batcher = asyncio.create_task(self._batches())
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((job, future))
        self.arrived.set()
        return await future  # a cancelled request (client gone) is dropped from the queue by `_take`

    @staticmethod
    def _rows(job: tuple) -> int:
        """Rows of one request's (config, rows)."""
        return len(job[1]["idx"])

    def _waiting_rows(self) -> int:
        return sum(self._rows(job) for job, future in self.waiting if not future.done())

    def _take(self) -> list[tuple]:
        """The next batch: the waiting requests in arrival order, at most max_batch_requests, less the last
        ones whose rows would all fall in a last, partial micro-batch after a full one (they go first next
        time, with what arrives meanwhile, instead of padding now). A request is never split; at least one."""
        batch = [entry for entry in self.waiting if not entry[1].done()][:self.max_batch_requests]
        rows = sum(self._rows(job) for job, _ in batch)
        full = rows - rows % self.micro_batch  # rows in whole micro-batches
        while len(batch) > 1 and full and rows > full and rows - self._rows(batch[-1][0]) >= full:
            rows -= self._rows(batch.pop()[0])
        chosen = {id(future) for _, future in batch}
        self.waiting = deque(entry for entry in self.waiting if id(entry[1]) not in chosen and not entry[1].done())
        return batch

    async def _batches(self) -> None:
        """Forever: wait for a request, give it up to batch_wait_s to gather a micro-batch of rows, run the
        batch in a thread and answer its requests. The next batch is made only now, when the engine is free."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            deadline = loop.time() + self.batch_wait_s
            while (self._waiting_rows() < self.micro_batch and len(self.waiting) < self.max_batch_requests
                   and (left := deadline - loop.time()) > 0):
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self._run, [job for job, _ in batch])
            except Exception as e:  # every request of the batch fails with it; the engine goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
            else:
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP: `/healthz`, `POST /v1/images`, the review page under `/review/`."""

    def __init__(self, engine, base: generate.Options, max_images: int, digest: str | None, table: str | None,
                 storage_options: dict | None):
        self.engine, self.base, self.max_images, self.digest = engine, base, max_images, digest
        self.table = OutputTable(table, storage_options) if table else None
        self.reviews = ReviewTable(table, storage_options) if table else None

    def _allowed(self, request: Request) -> bool:
        if self.digest is None:
            return True
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(token_digest(header[7:].strip()) or "", self.digest):
            return True
        return hmac.compare_digest(request.cookies.get(COOKIE, ""), session_value(self.digest))

    def _gate(self, request: Request, review: bool = True) -> Response | None:
        """A refusal for `request`, or None when it may go on."""
        if not self._allowed(request):
            return _error(401, "a token is needed: Authorization: Bearer <token>, or log in at /review/")
        if review and self.table is None:
            return _error(404, "serve was started without --table: there is nothing to review")
        return None

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.post("/v1/images")
    async def images(self, request: Request) -> Response:
        if (refused := self._gate(request, review=False)) is not None:
            return refused
        try:
            config, rows = parse_request(await request.json(), self.base, self.max_images)
        except ValueError:  # the body is not JSON
            return _error(400, "the body must be JSON")
        except InputError as e:
            return _error(400, str(e))
        result = await self.engine.generate.remote((config, rows))
        images = [{"idx": i, "sample": s, "image": base64.b64encode(data).decode("ascii"),
                   "image_format": config.image_format}
                  for i, s, data in zip(rows["idx"], rows["sample"], result["images"])]
        return JSONResponse({"images": images, "model": result["model"]})

    # -- the review page -------------------------------------------------------------------------

    @app.get("/review/")
    async def review_page(self, request: Request) -> Response:
        page = "review.html" if self._allowed(request) else "login.html"
        return HTMLResponse((ASSETS / page).read_text("utf-8"),
                            headers={"Cache-Control": "no-store"})

    @app.post("/review/login")
    async def login(self, request: Request) -> Response:
        form = (await request.body()).decode("utf-8", "replace")
        from urllib.parse import parse_qs

        token = (parse_qs(form).get("token") or [""])[0].strip()
        if self.digest is None or not hmac.compare_digest(token_digest(token) or "", self.digest):
            return _error(401, "wrong token")
        answer = RedirectResponse("/review/", status_code=303)
        answer.set_cookie(COOKIE, session_value(self.digest), httponly=True, samesite="strict",
                          secure=request.url.scheme == "https", path="/")
        return answer

    @app.get("/review/font")
    async def font(self, request: Request) -> Response:
        """The packaged Noto Sans CJK font, so captions render as Chinese on a machine without a CJK font."""
        if (refused := self._gate(request, review=False)) is not None:
            return refused
        path = packaged_font_path()
        if path is None:
            return _error(404, "the noto-cjk-sans-otc package is not installed")
        return FileResponse(path, media_type="font/collection", headers={"Cache-Control": "max-age=86400"})

    @app.get("/review/api/nights")
    async def review_nights(self, request: Request) -> Response:
        if (refused := self._gate(request)) is not None:
            return refused
        return JSONResponse(await asyncio.to_thread(review_pages.nights, self.table))

    @app.get("/review/api/pictures")
    async def review_pictures(self, request: Request) -> Response:
        if (refused := self._gate(request)) is not None:
            return refused
        q = request.query_params
        partitions = {k[2:]: v for k, v in q.items() if k.startswith("p.")}
        try:
            found = await asyncio.to_thread(
                review_pages.page, self.table, self.reviews, q.get("run_date", ""), number=int(q.get("page", 1)),
                per_page=int(q.get("per_page", 24)), text=q.get("q", ""), decision=q.get("decision", ""),
                partitions=partitions)
        except ValueError:
            return _error(400, "page and per_page must be integers")
        except PainterError as e:
            return _error(400, str(e))
        return JSONResponse(found, headers={"Cache-Control": "no-store"})

    @app.get("/review/api/image")
    async def review_image(self, request: Request) -> Response:
        if (refused := self._gate(request)) is not None:
            return refused
        q = request.query_params
        try:
            found = await asyncio.to_thread(review_pages.picture, self.table, q.get("run_date", ""),
                                            q.get("idx", ""), int(q.get("sample", "x")))
        except (ValueError, PainterError):
            return _error(400, "run_date (YYYY-MM-DD), idx and an integer sample are needed")
        if found is None:
            return _error(404, "no such picture")
        return Response(found[0], media_type=MIME.get(found[1], "application/octet-stream"),
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.post("/review/api/decisions")
    async def review_decide(self, request: Request) -> Response:
        if (refused := self._gate(request)) is not None:
            return refused
        try:
            recorded = await asyncio.to_thread(self._decide, await request.json())
        except ValueError:
            return _error(400, "the body must be JSON")
        except PainterError as e:
            return _error(400, str(e))
        return JSONResponse({"recorded": recorded})

    def _decide(self, body) -> int:
        if not isinstance(body, dict) or not isinstance(body.get("pictures"), list) or not body["pictures"]:
            raise InputError("give run_date, decision, reason, reviewer and a non-empty list of pictures")
        try:
            pictures = [(str(p["idx"]), int(p["sample"])) for p in body["pictures"]]
        except (TypeError, KeyError, ValueError):
            raise InputError("each picture must be {\"idx\": str, \"sample\": int}") from None
        run_date = str(body.get("run_date", ""))
        review_pages.check_run_date(run_date)
        missing = set(pictures) - review_pages.known_pictures(self.table, run_date, pictures)
        if missing:
            raise InputError(f"{len(missing)} picture(s) are not in the night {run_date}")
        reviewer = str(body.get("reviewer") or "anonymous").strip()[:100] or "anonymous"
        return self.reviews.append(run_date, pictures, str(body.get("decision", "")), body.get("reason"), reviewer)
