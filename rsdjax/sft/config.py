"""The fine-tuning config (`configs/train/lora-*.yaml`), YAML + dotted `key=value` overrides.

The optimizer, schedule, batch and checkpoint keys are the training config's (`rsdjax.train.config`):
one vocabulary for pre-training and fine-tuning. The first version's sft names are refused with a
message naming the new key.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rsdjax.config import ConfigError, apply_overrides, from_dict, load_yaml, preset_path
from rsdjax.model.lora import LoraConfig, LoraError
from rsdjax.sft.data import TEMPLATES
from rsdjax.train.config import DECAYS, CheckpointConfig, EvalConfig, OptimConfig

# the first version's fine-tuning key -> the training config's
RENAMED = {"optim.learning_rate": "optim.lr", "optim.grad_clip": "optim.clip_norm",
           "optim.end_lr_ratio": "optim.min_lr_ratio", "optim.steps": "steps", "optim.batch_size": "batch_size"}


@dataclasses.dataclass
class SFTDataConfig:
    train: str = "data/qa/train.jsonl"
    eval: str | None = None
    seq_len: int = 256
    pack: bool = True  # several short examples per row, kept apart by segment_ids
    template: str = "chat"  # chat (the tokenizer's own template) | llama3 | plain ("Question: ...\nAnswer: ...")


def _sft_optim() -> OptimConfig:
    # adapters start at zero and are few: a higher rate, no weight decay, Adam's usual b2
    return OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.0, b2=0.999)


@dataclasses.dataclass
class FinetuneConfig:
    base: str = "checkpoints/cpt-demo"  # HF Llama directory or rsdjax checkpoint
    tokenizer: str | None = None  # default: the base directory's tokenizer.json
    output: str = "checkpoints/lora-qa-demo"  # the PEFT adapter directory
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=_sft_optim)
    steps: int = 200  # optimizer updates
    batch_size: int = 8  # rows per update
    grad_accum: int = 1  # micro-batches per update (batch_size / grad_accum rows each)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=lambda: CheckpointConfig(every=50, keep=2))
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # >0: also write output/checkpoint-{step} adapters
    demo_questions: list[str] = dataclasses.field(default_factory=list)  # answered before/after by the CLI
    max_new_tokens: int = 48
    eval: EvalConfig | None = None  # held-out sources (text or Q&A jsonl): loss, perplexity, bits/byte per source

    @property
    def checkpoint_dir(self) -> Path:
        """Orbax checkpoints (adapter, optimizer state, step, data position, RNG) for resuming."""
        return Path(self.checkpoint.dir or Path(self.output) / "checkpoints")

    def validate(self) -> "FinetuneConfig":
        try:
            self.lora.validate()
        except LoraError as e:
            raise ConfigError(str(e)) from None
        o, d = self.optim, self.data
        for key, value in (("steps", self.steps), ("batch_size", self.batch_size), ("grad_accum", self.grad_accum),
                           ("data.seq_len", d.seq_len), ("log_every", self.log_every),
                           ("checkpoint.every", self.checkpoint.every), ("checkpoint.keep", self.checkpoint.keep)):
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if o.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        if not (o.lr > 0 and 0 <= o.min_lr_ratio <= 1):
            raise ConfigError("optim.lr must be positive and optim.min_lr_ratio in [0, 1]")
        if o.decay not in DECAYS:
            raise ConfigError(f"optim.decay must be one of {', '.join(DECAYS)}, got '{o.decay}'")
        if d.template not in TEMPLATES:
            raise ConfigError(f"data.template {d.template!r} is not one of {', '.join(TEMPLATES)}")
        if self.eval is not None:
            def need(ok: bool, msg: str):
                if not ok:
                    raise ConfigError(msg)

            self.eval.validate(need)
        return self


def _refuse_renamed(keys, where: str) -> None:
    for key in keys:
        if key in RENAMED:
            raise ConfigError(f"{where}: '{key}' is now '{RENAMED[key]}' (the training config's name)")


def load_finetune_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    path = preset_path("train", str(path))
    data = load_yaml(path)
    optim = data.get("optim")
    _refuse_renamed([f"optim.{k}" for k in (optim if isinstance(optim, dict) else {})], str(path))
    _refuse_renamed([o.split("=", 1)[0] for o in overrides], "override")
    try:
        cfg = from_dict(FinetuneConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(cfg, list(overrides)).validate()
