"""Formats: tables (TSV/Parquet through fsspec), images, token shards and rejected rows. No Ray here."""
