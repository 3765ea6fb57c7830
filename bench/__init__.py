"""Benchmarks: lmtune against Hugging Face Trainer, the hardware limit and simple baselines (python -m bench)."""
