"""Entry for `ray job submit -- python jobs/evaluate.py …`: the same code path as `painter evaluate`.

Works with the package installed on the cluster or shipped with `--working-dir .` (repo root).
"""
import os
import sys

# Python puts this script's folder first on sys.path, where jobs/tokenize.py would shadow the
# standard library's tokenize module (imported by logging); the repo root goes there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from painter.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
