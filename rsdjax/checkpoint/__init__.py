"""Checkpoint formats: HF safetensors directories, rsdjax (Orbax) checkpoints."""
