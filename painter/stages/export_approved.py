"""`painter export-approved`: a night's approved pictures (newest decision per picture in `<table>/_reviews`,
made on `painter serve`'s review page) as files named by idx and sample, plus `manifest.csv`."""
from __future__ import annotations

from painter.io.output import check_run_date
from painter.io.reviews import export_approved
from painter.io.storage import Storage
from painter.options.export_approved import Options


def preflight(options: Options) -> None:
    check_run_date(options.run_date)


def run(options: Options) -> dict:
    storage = Storage.from_option(options.storage_options)
    return export_approved(options.table, options.run_date, options.output, storage.options)
