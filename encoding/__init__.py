"""Encoding: how the whole project turns records into vectors (encoders, rendering, the recipe, the wire format).

Imports nothing from the worker (``encoder_worker``), the API (``service``), training, evaluation or bench.
"""
