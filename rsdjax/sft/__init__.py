"""Supervised fine-tuning (LoRA) on Q&A / chat data, on the training system (`rsdjax.train`).

    from rsdjax.sft import finetune, load_finetune_config, answer, compare_answers
    result = finetune(load_finetune_config("lora-qa-demo", ["base=checkpoints/cpt-demo"]))
"""
from rsdjax.sft.answers import answer, compare_answers, show_answers
from rsdjax.sft.config import FinetuneConfig, SFTDataConfig, load_finetune_config
from rsdjax.sft.data import SFTDataError
from rsdjax.sft.finetune import FinetuneResult, finetune, sft_loss

__all__ = ["FinetuneConfig", "FinetuneResult", "SFTDataConfig", "SFTDataError", "answer", "compare_answers",
           "finetune", "load_finetune_config", "sft_loss", "show_answers"]
