"""The model directory: its config, tokenizer, weights, fingerprints, importers and exporters."""
