"""`painter make-corpus`: write the synthetic Chinese-captioned corpus of `painter.evaluation.synthetic` as
EasyNLP TSV shards (`idx \\t text \\t base64 PNG`, no header), byte-identical for a seed. No Ray."""
from __future__ import annotations

from painter.io.retries import fsspec_module

from painter.evaluation import synthetic
from painter.errors import PainterError
from painter.options.make_corpus import MakeCorpusOptions, Options  # noqa: F401 (Options: the registry's name)

fsspec = fsspec_module()  # with painter's storage retries (painter.io.retries)


def run(o: MakeCorpusOptions) -> dict:
    try:
        held_out = synthetic.hold_out(o.hold_out_pairs, o.seed) if o.hold_out_pairs else []
        paths = synthetic.write_corpus(o.output, o.rows, o.shards, o.size, o.seed, held_out=held_out)
    except ValueError as e:  # options out of range
        raise PainterError(f"make-corpus: {e}") from None
    summary = {"output": o.output, "rows": o.rows, "files": paths, "size": o.size, "seed": o.seed}
    if held_out:
        path = o.output.rstrip("/") + "/_held_out.txt"
        with fsspec.open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(held_out) + "\n")
        pairs = sorted({(s.colour, s.shape) for s in map(synthetic.parse_caption, held_out)})
        summary.update(held_out=path, held_out_pairs=[c + "色" + s for c, s in pairs])
    return summary
