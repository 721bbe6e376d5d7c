"""`painter tokenize`'s options (the job: `painter.stages.tokenize`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.io.formats import COLUMNS_HELP, DEFAULT_MAX_PIXELS, FORMATS_HELP, RESIZE_MODES
from painter.options import max_error_rate_option, option

DEFAULT_SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"
# Rows per token-shard file (~10-20 MB of Parquet for a 256-token model). Ray Data gathers a file's rows
# in the object store before its write task runs: at 100,000 rows (~130 MB) that buffer outgrew the job's
# store budget (painter.stages.tokenize), and the 200k-row scale run stalled behind it (its reader idle for
# a minute at a time) while the store's peak grew with the corpus (41.7 MB at 20k rows, 169.7 MB at 200k).
ROWS_PER_FILE = 16_384


@dataclass(kw_only=True)
class Options:
    RENAMED = {"batch_size": "micro_batch"}  # its name until issue #31; records written then still read (upgrade)

    input: list[str] = option(help="files, globs, directories or s3:// prefixes to read; " + FORMATS_HELP)
    model: str = option(help="model directory (or zoo name) whose VQGAN and vocabulary make the tokens")
    output: str = option(help="directory (local or s3://) for the token shards")
    input_schema: str = option(DEFAULT_SCHEMA, "TSV columns, EasyNLP style; must name idx, text and imgbase64 "
                                               "(or, with --columns, the input names mapped onto them)")
    columns: str | None = option(None, COLUMNS_HELP)
    errors: str | None = option(None, "where rejected rows go (default: <output>/_rejected/)")
    max_error_rate: float = max_error_rate_option()
    micro_batch: int = option(64, "images per model call on the device (the VQGAN's; an encoder actor's call is one)")
    actors: int | None = option(None, "encoder actors (default: one per GPU; on a CPU-only cluster one per CPU, "
                                      "each decoding its own rows)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "reject images with more pixels (checked before decoding)")
    resize: str = option("pil", "pil: EXIF rotation, alpha on white, antialiased bicubic (the default: no aliasing "
                                "when shrinking photos); easynlp: EasyNLP/taming's plain RGB and OpenCV bilinear "
                                "SmallestMaxSize, to encode exactly the tokens the reference would",
                         choices=RESIZE_MODES)
    storage_options: str | None = option(None, "JSON object of fsspec/s3fs options for the input and output "
                                               "paths, e.g. '{\"endpoint_url\": \"http://...\"}'; credentials "
                                               "come from the usual AWS environment variables by default")
    rows_per_file: int = option(ROWS_PER_FILE, "target rows per token-shard file; Ray gathers them in its object "
                                               "store before writing (~1 KB a row), so keep it within the store")
    overwrite: bool = option(False, "delete what --output and --errors hold before writing")

