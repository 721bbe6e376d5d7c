"""`painter export-approved`'s options (the command: `painter.stages.export_approved`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.options import option


@dataclass(kw_only=True)
class Options:
    table: str = option(help="the generate output table root (its decisions are in <table>/_reviews)")
    run_date: str = option(help="the night to export, YYYY-MM-DD")
    output: str = option(help="folder (local or s3://) for the pictures and manifest.csv")
    storage_options: str | None = option(None, "fsspec options as JSON, for the table and the output")
