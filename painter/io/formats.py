"""The names and limits of what painter reads and writes that the command line shows as defaults, choices
and help: image encodings, pixel rounding, resize modes, the pixel limit, the input formats, `--columns`.

Plain constants, no imports: `painter.options` builds every command's `--help` from them without loading
pyarrow, numpy or Pillow. The modules that implement them (`painter.io.images`, `painter.io.tables`,
`painter.io.columns`) import them from here.
"""

IMAGE_FORMATS = ("png", "jpeg", "webp")
PIXEL_ROUNDING = ("round", "truncate")  # float -> 8-bit: nearest level, or EasyNLP's astype(np.uint8)
RESIZE_MODES = ("pil", "easynlp")  # see painter.io.images
DEFAULT_MAX_PIXELS = 40_000_000
FORMATS_HELP = ("the file name selects the format: EasyNLP TSV without header (corpus/part-0.tsv, also .txt, "
                ".tsv.gz, .tsv.zst); Parquet (hf/train-00000.parquet; image bytes, base64 or Hugging Face image "
                "structs); CSV with a header row (table.csv); JSON lines (rows.jsonl); WebDataset shards "
                "(shards/00000.tar, a folder of them as img2dataset writes, or 'shards/*.tar'); an image folder "
                "(photos/ holding images and metadata.jsonl or metadata.csv with file_name and a caption column)")
COLUMNS_HELP = ("map input columns onto painter's: idx=NAME,text=NAME,image=NAME (a table column, a CSV header "
                "name, a WebDataset member's extension or a field of its .json member), e.g. "
                "--columns idx=key,text=caption,image=jpg; an image column may hold base64 text, bytes or a "
                "Hugging Face image struct {bytes, path}")
