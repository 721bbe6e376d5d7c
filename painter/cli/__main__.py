"""`python -m painter.cli`: the `painter` command."""
from painter.cli.main import entry

entry()
