"""Generation and encoding: sampling, the decode engine, rerank, `Generator`, image encoders. No Ray."""
