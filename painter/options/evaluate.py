"""`painter evaluate`'s options (the job: `painter.stages.evaluate`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.io.formats import COLUMNS_HELP
from painter.options import max_error_rate_option, option


@dataclass(kw_only=True)
class Options:
    model: str | None = option(None, "model directory (local, s3:// or a zoo name): generates the caption "
                               "images, and its VQGAN reconstructs --corpus")
    captions: int = option(200, "synthetic captions to generate and judge (0: none)")
    caption_seed: int = option(0, "which evaluation captions (painter.evaluation.synthetic.captions_for_eval)")
    held_out: str | None = option(None, "draw captions only from this file of captions kept out of training "
                                  "(<corpus>/_held_out.txt of a synthetic corpus made with held out pairs)")
    samples: int = option(1, "images per caption")
    seed: int = option(0, "sampling seed: the image of (seed, idx, sample) is always the same")
    temperature: float = option(1.0, "sampling temperature; 0 is greedy")
    top_k: int = option(100, "sample among the k likeliest codes; 0 turns top-k off")
    top_p: float | None = option(None, "nucleus sampling threshold in (0, 1]")
    guidance: float | None = option(None, "classifier-free guidance scale S (1: none; default: painter.inference.generator."
                                          "DEFAULT_GUIDANCE for a model trained with caption dropout, else 1)")
    candidates: int = option(1, "images drawn per caption and sample; the best-scored one is judged")
    scorer: str | None = option(None, "image-text scorer file for --candidates (.pt2 / TorchScript; TRUSTED FILES "
                                      "ONLY) instead of the model's own caption-vs-null likelihood ratio")
    micro_batch: int | None = option(None, "images per model call on the device: the GPT's (which generated images "
                                     "depend on), the VQGAN's and the feature network's (default: 8 on CPU, 64 on GPU)")
    device: str | None = option(None, "cpu or cuda (default: cuda when this process has one)")
    generated: list[str] = option([], "score existing images instead of generating: a generate output root, "
                                  "a run_date=D folder of it, or TSV/Parquet files with text and image columns")
    generated_date: str | None = option(None, "run_date of a generate output root to score (default: the latest committed)")
    generated_schema: str = option("idx:str:1,text:str:1,imgbase64:str:1", "TSV columns of --generated files")
    corpus: list[str] = option([], "TSV/Parquet images for the VQGAN reconstruction error and codebook usage")
    reference: list[str] = option([], "TSV/Parquet real images for FID (needs a feature extractor)")
    input_schema: str = option("idx:str:1,text:str:1,imgbase64:str:1", "TSV columns of --corpus and --reference")
    columns: str | None = option(None, COLUMNS_HELP)
    limit: int = option(10000, "use at most this many images of each of --generated, --corpus and --reference (0: all)")
    feature_extractor: str | None = option(None, "torch.export .pt2 or TorchScript feature network for FID/IS "
                                           "(TRUSTED FILES ONLY: loading it runs code from it)")
    feature_size: int | None = option(None, "image side the extractor takes, when the file does not declare it")
    is_splits: int = option(1, "splits for the Inception Score's standard deviation (10 in the usual protocol)")
    output: str | None = option(None, "folder for summary.json, contact_sheet.png and rejected.parquet")
    sheet_images: int = option(32, "judged images on the contact sheet")
    font: str | None = option(None, "caption font file (default: a CJK font found on the system)")
    max_error_rate: float = max_error_rate_option()
    storage_options: str | None = option(None, "fsspec options as JSON (default: credentials from the environment)")
