"""The error every checkpoint reader and writer raises (safetensors, HF, native, PEFT, training)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the tensor."""
