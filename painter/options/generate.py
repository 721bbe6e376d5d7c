"""`painter generate`'s options (the job: `painter.stages.generate`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.io.formats import COLUMNS_HELP, IMAGE_FORMATS, PIXEL_ROUNDING
from painter.options import max_error_rate_option, option


@dataclass(kw_only=True)
class Options:
    input: list[str] = option(help="TSV or Parquet files, globs or s3:// prefixes holding the prompts")
    model: str = option(help="model directory (local, s3:// or a zoo name)")
    output: str = option(help="output table root (local or s3://)")
    input_schema: str = option("idx:str:1,text:str:1", "TSV columns, EasyNLP style")
    columns: str | None = option(None, COLUMNS_HELP)
    errors: str | None = option(None, "where rejected rows go instead of <output>/_rejected")
    max_error_rate: float = max_error_rate_option()
    samples: int = option(1, "images per prompt")
    seed: int = option(0, "the image of (seed, idx, sample) is always the same")
    temperature: float = option(1.0, "sampling temperature; 0 is greedy")
    top_k: int = option(100, "sample among the k likeliest codes; 0 turns top-k off")
    top_p: float | None = option(None, "nucleus sampling threshold in (0, 1]")
    guidance: float | None = option(None, "classifier-free guidance scale S (1: none; default: painter.inference.generator."
                                          "DEFAULT_GUIDANCE for a model trained with caption dropout, else 1)")
    candidates: int = option(1, "images drawn per (idx, sample); the best-scored is kept, its score a column")
    scorer: str | None = option(None, "image-text scorer file for --candidates (.pt2 / TorchScript; TRUSTED FILES "
                                      "ONLY) instead of the model's own caption-vs-null likelihood ratio")
    keep_rows: int = option(0, "with an input column prompt_image (an image, or base64): keep its first K token "
                               "rows and generate the rest")
    batch_size: int | None = option(None, "rows per actor call, one data file per batch and partition; "
                                    "best a multiple of --micro-batch (default: 4 micro-batches)")
    micro_batch: int | None = option(None, "rows per model call: a fixed shape (short batches are padded) "
                                     "that makes images independent of batching (default: 8 on CPU, 64 on GPU)")
    actors: int | None = option(None, "actor pool size (default: one per GPU, else half the CPUs)")
    partition_by: list[str] = option([], "input columns to partition the output by, after run_date")
    run_date: str | None = option(None, "the night: today, yesterday, YYYY-MM-DD, or a range A..B run night by night "
                                  "(a backfill); fills {run_date} and {run_date:FORMAT} (strftime) in --input, "
                                  "--output, --errors and --tsv-output (default: today)")
    timezone: str = option("UTC", "the time zone (IANA name) whose date is 'today'")
    keep_going: bool = option(False, "in a backfill, run the remaining nights after one fails")
    image_format: str = option("png", "image encoding of the `image` column (named in `image_format`)",
                               choices=IMAGE_FORMATS)
    commit_images: int = option(1024, "images per Delta commit: the night becomes visible in commits of whole "
                                "batches holding at least this many images (the last one fewer)")
    precision: str | None = option(None, "model weights for generation: fp32 or bf16 (default: bf16 on GPU, "
                                   "fp32 on CPU); images depend on it", choices=("fp32", "bf16"))
    pixel_rounding: str = option("round", "model output to 8 bits: nearest level, or truncated as EasyNLP does",
                                 choices=PIXEL_ROUNDING)
    tsv_output: str | None = option(None, "also write the night as EasyNLP's predict TSV: idx, text, gen_imgbase64 "
                                    "(one line per prompt, a list of base64 PNGs)")
    contact_sheet: bool = option(True, "write a contact sheet PNG under <output>/_sheets/")
    gallery: bool = option(False, "also write a static HTML gallery beside the contact sheet")
    sheet_prompts: int = option(16, "prompts shown on the contact sheet and gallery")
    font: str | None = option(None, "caption font file (default: a CJK font found on the system)")
    storage_options: str | None = option(None, "fsspec options as JSON, for the driver and every worker (default: "
                                         "each process's own AWS credential chain: environment, ~/.aws, role)")
