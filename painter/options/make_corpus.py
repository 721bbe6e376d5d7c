"""`painter make-corpus`'s options (the command: `painter.stages.make_corpus`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.options import option


@dataclass(kw_only=True)
class MakeCorpusOptions:
    output: str = option(help="directory (local or s3://) to write part-NNNNN.tsv shards into")
    rows: int = option(10000, "rows (one scene and its caption each)")
    shards: int = option(4, "TSV files to split the rows over")
    size: int = option(32, "image side in pixels")
    seed: int = option(0, "seed: the same seed and options write byte-identical files")
    hold_out_pairs: int = option(0, "(colour, shape) pairs never drawn, to evaluate unseen "
                                    "combinations; their captions go to <output>/_held_out.txt")


Options = MakeCorpusOptions
