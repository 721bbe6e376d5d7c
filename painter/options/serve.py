"""`painter serve`'s options (the command: `painter.stages.serve`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.options import option


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
