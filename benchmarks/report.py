"""A benchmark's JSON object, built section by section and on disk after each one.

A GPU run is short and scarce: a step that fails or is killed by its time limit must not take the
figures measured before it. `Report.section(name, fn)` runs one measurement, stores its result under
`name` ("a/b" nests; or, if it raises, its message under `errors[name]`), and rewrites the file atomically (a
temporary file renamed over the old one), so a reader never sees half a file and a killed run leaves
every finished section. A section whose turn comes after the deadline is recorded as skipped.
`finish()` marks the run complete; a file without `"complete": true` is from a run that stopped.

    report = Report(path, {"preset": "base"}, deadline=time.perf_counter() + 100)
    ours = report.section("ours", lambda: measure(...))
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable


class Report:
    def __init__(self, path: str | os.PathLike | None, initial: dict | None = None, *, deadline: float | None = None,
                 announce: bool = True):
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = dict(initial or {})
        self.deadline = deadline
        self.announce = announce  # one stderr line per section written (a reader can wait for it)
        self.write()

    def section(self, name: str, fn: Callable[[], Any], *, reserve_s: float = 0.0) -> Any:
        """fn()'s value, stored under `name` and written; None if it raised (message under errors[name])
        or if fewer than `reserve_s` seconds are left before the deadline (noted under skipped[name])."""
        value = None
        if self.deadline is not None and time.perf_counter() + reserve_s > self.deadline:
            self.data.setdefault("skipped", {})[name] = "time budget"
        else:
            try:
                value = fn()
                self._place(name, value)
            except Exception as e:  # noqa: BLE001 -- recorded: the next sections still run
                traceback.print_exc(file=sys.stderr)
                self.data.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        self.write()
        if self.announce:
            print(f"report: section {name} written", file=sys.stderr, flush=True)
        return value

    def _place(self, name: str, value: Any) -> None:
        """Store under `name`; "train/base" nests (data["train"]["base"])."""
        *parents, leaf = name.split("/")
        target = self.data
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.data, ensure_ascii=False) + "\n")
        os.replace(temporary, self.path)

    def finish(self) -> dict:
        self.data["complete"] = True  # the run reached its end (failed sections are under "errors")
        self.write()
        return self.data
