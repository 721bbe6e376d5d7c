"""`painter serve`: the generation engine as a Ray Serve application on the current Ray, and the review
page over a generate output table (`painter.stages.serve_app` holds the deployments).

`start(options)` deploys it and returns where it listens; `run(options)` (the command) deploys it and
waits until SIGTERM/SIGINT, then shuts Serve down. Listening on anything but loopback needs `--token`
(`env:NAME` or `@PATH`, read like `--storage-options`; the token is never printed or logged).
"""
from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass

from painter import logs
from painter.errors import InputError
from painter.io.storage import Storage
from painter.io.storage_options import read_source
from painter.options import option
from painter.stages import generate

STAGE = "serve"
APP_NAME = "painter"
log = logs.get(STAGE)


@dataclass(kw_only=True)
class Options:
    model: str = option(help="model directory (local, s3:// or a zoo name)")
    table: str | None = option(None, "a generate output table root to review at /review/ (decisions go to "
                                     "<table>/_reviews)")
    host: str = option("127.0.0.1", "address to listen on; anything but loopback needs --token")
    port: int = option(8000, "HTTP port")
    token: str | None = option(None, "where the access token is: env:NAME or @PATH (never the token itself)")
    replicas: int = option(1, "engine replicas, a fixed number (or give both autoscaling bounds)")
    min_replicas: int | None = option(None, "autoscaling: the fewest engine replicas (give both bounds)")
    max_replicas: int | None = option(None, "autoscaling: the most engine replicas (give both bounds)")
    num_gpus: float = option(0.0, "GPUs per engine replica (0: CPU)")
    num_cpus: float = option(0.5, "CPUs reserved per engine replica (on CPU it computes on one torch thread, "
                                  "as painter generate does, for the same pixels: scale with replicas)")
    micro_batch: int | None = option(None, "rows per model call, as in painter generate (images depend on "
                                     "it; default: 8 on CPU, 64 on GPU)")
    precision: str | None = option(None, "model weights, as in painter generate", choices=("fp32", "bf16"))
    pixel_rounding: str = option("round", "model output to 8 bits, as in painter generate", choices=("round", "truncate"))
    max_images: int = option(64, "most images (prompts x samples) one request may ask for")
    max_batch_requests: int = option(16, "most requests gathered into one engine call")
    batch_wait_ms: float = option(10.0, "how long a lone request waits for others to fill a micro batch")
    storage_options: str | None = option(None, "fsspec options as JSON, for the model and the table")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def preflight(options: Options) -> None:
    """Refusals before Ray starts: a non-loopback host without a token, bad numbers, an unreadable token."""
    if not is_loopback(options.host) and not options.token:
        raise InputError(f"--host {options.host} is not loopback: give --token env:NAME or @PATH, so that "
                         "only holders of the token can generate or review")
    if options.token is not None and not read_source(options.token, "--token", what="the token").strip():
        raise InputError("--token: the token is empty")
    for name in ("replicas", "max_images", "max_batch_requests"):
        if getattr(options, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if (options.min_replicas is None) != (options.max_replicas is None):
        raise InputError("--min-replicas and --max-replicas go together")
    if options.min_replicas is not None and not 0 <= options.min_replicas <= options.max_replicas:
        raise InputError("--min-replicas must be in 0..--max-replicas")
    if not 0 < options.port < 65536:
        raise InputError("--port must be in 1..65535")
    base_generate_options(options)


def base_generate_options(options: Options) -> generate.Options:
    """The generate job's options that the server fixes (model, precision, pixel rounding, micro-batch);
    each request replaces the sampling ones, and `generate.generation_config` makes the config."""
    base = generate.Options(input=[], model=options.model, output="", precision=options.precision,
                            pixel_rounding=options.pixel_rounding, micro_batch=options.micro_batch)
    generate.generation_config(base)  # InputError now rather than on the first request
    return base


def _engine_options(options: Options) -> dict:
    if options.min_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": options.max_batch_requests}}
    else:
        scaling = {"num_replicas": options.replicas}
    return scaling | {"ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
                      "max_ongoing_requests": 4 * options.max_batch_requests}


def build(options: Options):
    """The Serve application (not yet running)."""
    from painter.stages.serve_app import Engine, Ingress, token_digest

    storage = Storage.from_option(options.storage_options)
    token = read_source(options.token, "--token", what="the token").strip() if options.token else None
    engine = Engine.options(**_engine_options(options)).bind(
        options.model, options.micro_batch, storage.options, options.max_batch_requests,
        options.batch_wait_ms / 1000)
    return Ingress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256).bind(
        engine, base_generate_options(options), options.max_images, token_digest(token), options.table,
        storage.options)


def start(options: Options) -> dict:
    """Deploy the application on the current Ray (started by the caller) and return where it listens."""
    from ray import serve

    preflight(options)
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(build(options), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{options.host}:{options.port}"
    return {"url": url, "review": f"{url}/review/" if options.table else None, "auth": bool(options.token)}


def run(options: Options) -> dict:
    """Serve until SIGTERM/SIGINT; then shut Serve down and return the summary."""
    from ray import serve

    summary = start(options)
    log.info("serving on %s (review: %s)", summary["url"], summary["review"] or "off: no --table")
    try:
        threading.Event().wait()
    finally:
        serve.shutdown()
    return summary
