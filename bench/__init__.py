"""Benchmarks of the llmatch service; run them as ``python -m bench.<name>`` from the repository root."""
