"""A `painter.logs.Progress` on the driver fed by Ray workers through a small actor (`Board`): a worker calls
`board.set.remote(done, note)`; the driver polls it."""
from __future__ import annotations
import threading
import ray
from painter import logs


class Board:
    """Ray actor state behind `remote_progress`: the latest (done, note) a worker set."""

    def __init__(self):
        self.done, self.note = 0, ""

    def set(self, done: int, note: str = "") -> None:
        self.done, self.note = done, note or self.note

    def get(self) -> tuple[int, str]:
        return self.done, self.note


class remote_progress:  # noqa: N801 (used like a function: `with remote_progress(...) as board:`)
    """A `Progress` on the driver fed by workers: `with remote_progress("train", 1000, "steps") as board:`
    pass `board` (an actor handle) to the workers, which call `board.set.remote(step, note)`."""

    def __init__(self, stage: str, total: int | None, unit: str, start: int = 0, poll: float = 0.5):
        self.actor = ray.remote(num_cpus=0)(Board).remote()
        self.progress = logs.Progress(stage, total, unit, start=start)
        self.poll, self.stop = poll, threading.Event()
        self.thread = threading.Thread(target=self._watch, name=f"painter-progress-{stage}", daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(self.poll):
            try:
                done, note = ray.get(self.actor.get.remote(), timeout=10)
            except Exception:  # the poll is best effort: the job's own errors come from the job
                continue
            if done:
                self.progress.set(done, note)

    def __enter__(self):
        self.progress.__enter__()
        self.thread.start()
        return self.actor

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        try:
            self.progress.done, note = ray.get(self.actor.get.remote(), timeout=10)
            self.progress.note = note or self.progress.note
        except Exception:  # the actor's last word is best effort too
            pass
        self.progress.close()
        ray.kill(self.actor)


