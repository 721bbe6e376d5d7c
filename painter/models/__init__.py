"""Neural network definitions of painter: the VQGAN image tokenizer and the text-to-image GPT."""
