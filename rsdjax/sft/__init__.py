"""Supervised fine-tuning (LoRA) on Q&A / chat data.

    from rsdjax.sft import finetune, load_finetune_config, answer, compare_answers
    result = finetune(load_finetune_config("lora-qa-demo", ["base=checkpoints/cpt-demo"]))
"""
from rsdjax.sft.config import FinetuneConfig, OptimConfig, SFTDataConfig, load_finetune_config
from rsdjax.sft.data import SFTDataError
from rsdjax.sft.finetune import FinetuneResult, finetune
from rsdjax.sft.generate import answer, compare_answers, show_answers
from rsdjax.sft.loop import LoraTrainer, make_optimizer, sft_loss

__all__ = ["FinetuneConfig", "FinetuneResult", "LoraTrainer", "OptimConfig", "SFTDataConfig", "SFTDataError",
           "answer", "compare_answers", "finetune", "load_finetune_config", "make_optimizer", "sft_loss",
           "show_answers"]
