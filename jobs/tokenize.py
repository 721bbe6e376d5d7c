"""Entry for `ray job submit -- python jobs/tokenize.py …`: the same code path as `painter tokenize`.

Works with the package installed on the cluster or shipped with `--working-dir .` (repo root).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when shipped as working dir

from painter.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
