"""The `painter` command line: the shell over the jobs (parsing, Ray start, the last JSON line, exit codes).

Nothing in painter imports it; `painter.cli.main.entry` is the console script and what `jobs/*_job.py` run.
"""
