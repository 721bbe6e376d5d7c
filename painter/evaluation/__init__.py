"""Scoring: metrics (FID/IS), the synthetic task and its judge, VQGAN reconstruction. No Ray."""
