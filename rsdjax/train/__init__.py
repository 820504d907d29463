"""Continual pre-training: configs, optimizer, the generic train step, checkpoints, metrics, the loop.

The reusable core for other training modes (LoRA) is `rsdjax.train.step.TrainStep` (trainable
variables chosen by an nnx filter) and `rsdjax.train.checkpoint.TrainCheckpointer`.
"""
