"""painter: Chinese text-to-image generation (a GPT over VQGAN image tokens) as batch jobs on Ray.

`pipeline("text2image_generation", model_dir)` is the quick Python entry; the jobs (`painter
tokenize|train|generate`) live in `painter.stages` and are started from `painter.cli`.
"""
__version__ = "0.1.0"

from painter.io.retries import configure_storage_retries as _configure_storage_retries

_configure_storage_retries()  # bounded retries of transient storage errors in every process (painter.io.retries)


def pipeline(task: str, model_dir: str | None = None, device=None):
    """Build a text-to-image callable; see `painter.pipeline.pipeline`."""
    from painter.pipeline import pipeline as _pipeline

    return _pipeline(task, model_dir, device=device)
