"""The fine-tuning config (`configs/train/lora-*.yaml`), YAML + dotted `key=value` overrides."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rsdjax.config import ConfigError, apply_overrides, from_dict, load_yaml, preset_path
from rsdjax.model.lora import LoraConfig, LoraError
from rsdjax.sft.data import TEMPLATES


@dataclasses.dataclass
class SFTDataConfig:
    train: str = "data/qa/train.jsonl"
    eval: str | None = None
    seq_len: int = 256
    pack: bool = True  # several short examples per row, kept apart by segment_ids
    template: str = "chat"  # chat (the tokenizer's own template) | llama3 | plain ("Question: ...\nAnswer: ...")


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 10  # capped at `steps`
    steps: int = 200
    batch_size: int = 8
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    end_lr_ratio: float = 0.1  # cosine decays to learning_rate * end_lr_ratio


@dataclasses.dataclass
class FinetuneConfig:
    base: str = "checkpoints/cpt-demo"  # HF Llama directory or rsdjax checkpoint
    tokenizer: str | None = None  # default: the base directory's tokenizer.json
    output: str = "checkpoints/lora-qa-demo"  # the PEFT adapter directory
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # >0: also write output/checkpoint-{step} adapters
    demo_questions: list[str] = dataclasses.field(default_factory=list)  # answered before/after by the CLI
    max_new_tokens: int = 48

    def validate(self) -> "FinetuneConfig":
        try:
            self.lora.validate()
        except LoraError as e:
            raise ConfigError(str(e)) from None
        o, d = self.optim, self.data
        for key, value in (("optim.steps", o.steps), ("optim.batch_size", o.batch_size), ("data.seq_len", d.seq_len),
                           ("log_every", self.log_every)):
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if o.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        if d.template not in TEMPLATES:
            raise ConfigError(f"data.template {d.template!r} is not one of {', '.join(TEMPLATES)}")
        return self


def load_finetune_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    path = preset_path("train", str(path))
    data = load_yaml(path)
    try:
        cfg = from_dict(FinetuneConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(cfg, list(overrides)).validate()
