"""Fault-injection and load harness: real `llmatch serve` / `llmatch worker` processes on 127.0.0.1."""
