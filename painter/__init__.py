"""painter: Chinese text-to-image generation (a GPT over VQGAN image tokens) as batch jobs on Ray.

`pipeline("text2image_generation", model_dir)` is the quick Python entry; the jobs (`painter
tokenize|train|generate`) live in `painter.stages` and are started from `painter.cli`.
"""
__version__ = "0.1.0"

# Storage retries are set where storage is first used (painter.io.retries.fsspec_module), so importing
# painter needs no fsspec: the model, inference and training modules run on a bare GPU box.


def pipeline(task: str, model_dir: str | None = None, device=None):
    """Build a text-to-image callable; see `painter.pipeline.pipeline`."""
    from painter.pipeline import pipeline as _pipeline

    return _pipeline(task, model_dir, device=device)
