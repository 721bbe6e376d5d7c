"""EasyNLP compatibility: its text2image flags, modes and formats."""
