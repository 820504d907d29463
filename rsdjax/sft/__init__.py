"""Supervised fine-tuning (LoRA) on Q&A / chat data, on the training system (`rsdjax.train`).

    from rsdjax.sft import finetune, load_finetune_config, answer, compare_answers
    result = finetune(load_finetune_config("lora-qa-demo", ["base=checkpoints/cpt-demo"]))

Names are imported on first use: the CLI reads `rsdjax.sft.data` for its help text, and that must
not import the trainer (orbax, optax) into every `rsdjax` command.
"""
import importlib

_HOMES = {"answer": "answers", "compare_answers": "answers", "show_answers": "answers",
          "FinetuneConfig": "config", "SFTDataConfig": "config", "load_finetune_config": "config",
          "SFTDataError": "data", "FinetuneResult": "finetune", "finetune": "finetune", "sft_loss": "finetune"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'rsdjax.sft' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rsdjax.sft.{_HOMES[name]}"), name)


__all__ = sorted(_HOMES)
