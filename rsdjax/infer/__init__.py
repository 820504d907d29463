"""Inference: sampling, the slot engine, text-level stopping."""
