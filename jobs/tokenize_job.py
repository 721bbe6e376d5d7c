"""Entry for `ray job submit -- python jobs/tokenize_job.py …`: the same code path as `painter tokenize`.

Works with the package installed on the cluster or shipped with `--working-dir .` (Ray puts the working
directory on the job's PYTHONPATH). Python puts this script's folder first on sys.path; the `_job` suffix
keeps every name in it from shadowing a module (`jobs/tokenize.py` once hid the standard library's).
"""
import sys

from painter.cli.main import entry

if __name__ == "__main__":
    entry(["tokenize", *sys.argv[1:]])
