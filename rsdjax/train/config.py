"""The training config: one YAML file (configs/train/*.yaml) plus `key=value` overrides.

`model` is a preset name (`model: tiny`) or a mapping with a `preset` key and field overrides
(`model: {preset: llama3-8b, remat: true}`). Relative paths are relative to the working directory.
Every check that does not need the data or devices runs here, before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rsdjax.config import (ConfigError, ModelConfig, apply_overrides, from_dict, load_model_config, load_yaml,
                           to_dict)

DECAYS = ("cosine", "linear", "constant")


@dataclass
class SourceConfig:
    name: str
    paths: list[str]
    weight: float = 1.0  # relative share of training windows (normalised over sources)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 512
    cache_dir: str | None = None  # token stores; None: <run_dir>/token_store


@dataclass
class TokenizerBuild:
    """Build the tokenizer when `tokenizer.path` has none: train a base on one corpus, extend on another."""

    extend_corpus: list[str]
    add: int
    base_corpus: list[str] = field(default_factory=list)  # needed only when tokenizer.base does not exist yet
    base_vocab_size: int = 512


@dataclass
class TokenizerConfig:
    path: str  # the tokenizer this run trains with
    base: str | None = None  # the init model's tokenizer; when it differs from `path` the vocab is resized
    build: TokenizerBuild | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # decay ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear (re-)warm-up at the start of each stage
    decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1  # AdamW decoupled decay, on weight matrices (not norm scales)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient norm clip; 0 disables


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <run_dir>/checkpoints
    every: int = 100  # save every N steps (and at the end, and on SIGTERM/SIGINT)
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True  # write in the background while training continues


@dataclass
class LogConfig:
    every: int = 10  # print a line every N steps when stdout is not a terminal
    progress: bool = True  # rich progress bar on a terminal
    tensorboard: bool = True
    peak_tflops: float | None = None  # for MFU; None: from the hardware preset


@dataclass
class EvalSourceConfig:
    name: str
    paths: list[str]  # held-out files, directories or globs (.txt / .jsonl text, or Q&A jsonl for LoRA)


@dataclass
class EvalConfig:
    """Held-out evaluation during training: loss, perplexity, bits per byte per source (rsdjax.eval)."""

    sources: list[EvalSourceConfig] = field(default_factory=list)
    holdout: float = 0.0  # also hold out this fraction of each training source's files (removed from training)
    every: int = 0  # also every N steps; 0: only at the start and the end
    at_start: bool = True  # before the first step of a fresh run (the "before" figures)
    at_end: bool = True
    batch_size: int | None = None  # rows per eval step; None: the train micro-batch (batch_size / grad_accum)
    seq_len: int | None = None  # None: data.seq_len

    def validate(self, need) -> None:
        need(bool(self.sources) or self.holdout > 0,
             "eval.sources is empty and eval.holdout is 0; give held-out files or a fraction, or drop eval")
        need(0 <= self.holdout < 1, f"eval.holdout must be in [0, 1), got {self.holdout}")
        need(self.every >= 0, f"eval.every must be >= 0, got {self.every}")
        need(self.batch_size is None or self.batch_size > 0, "eval.batch_size must be positive")
        need(self.seq_len is None or self.seq_len > 0, "eval.seq_len must be positive")
        need(len({s.name for s in self.sources}) == len(self.sources), "eval source names must be unique")
        for s in self.sources:
            need(bool(s.paths), f"eval source '{s.name}': paths is empty")


@dataclass
class TrainConfig:
    name: str = "run"
    run_dir: str = "checkpoints/run"  # checkpoints, logs, loss curve, final model
    model: ModelConfig = field(default_factory=ModelConfig)
    init_from: str | None = None  # HF Llama dir or rsdjax checkpoint; None: random init from `seed`
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(path=""))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000  # optimizer updates in all
    batch_size: int = 8  # global batch (windows per update)
    grad_accum: int = 1  # micro-batches per update (batch_size / grad_accum each)
    embedding_steps: int = 0  # first stage: train only embeddings + LM head for this many steps
    embedding_lr: float | None = None  # peak learning rate of that stage; None: optim.lr
    embedding_rows: str = "all"  # all | new: that stage updates only the new tokens' rows (old ones stay)
    vocab_multiple: int = 128  # pad the resized vocabulary to a multiple of this
    seed: int = 0  # model init, data order and the train RNG
    mesh: str | None = None  # e.g. "fsdp=2,tensor=4"; None: the hardware preset's mesh
    hardware: str | None = None  # preset for the mesh and MFU peak; None: cpu
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export_hf: bool = False  # also write the final model as an HF directory
    eval: EvalConfig | None = None  # held-out evaluation; None: none

    # ------------------------------------------------------------ derived paths

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")

    @property
    def cache_dir(self) -> Path:
        return Path(self.data.cache_dir or Path(self.run_dir) / "token_store")

    @property
    def stages(self) -> list[tuple[str, int, int]]:
        """(name, first step, end step) of each training stage."""
        if self.embedding_steps:
            return [("embeddings", 0, self.embedding_steps), ("all", self.embedding_steps, self.steps)]
        return [("all", 0, self.steps)]

    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(f"train config '{self.name}': {msg}")

        self.model.validate()
        need(self.steps > 0, f"steps must be positive, got {self.steps}")
        need(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        need(self.grad_accum > 0 and self.batch_size % self.grad_accum == 0,
             f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        need(0 <= self.embedding_steps < self.steps,
             f"embedding_steps={self.embedding_steps} must be in [0, steps={self.steps})")
        need(self.embedding_rows in ("all", "new"), f"embedding_rows must be all or new, got '{self.embedding_rows}'")
        need(self.embedding_lr is None or self.embedding_lr > 0, "embedding_lr must be positive")
        need(self.data.seq_len > 0, f"data.seq_len must be positive, got {self.data.seq_len}")
        need(self.data.seq_len <= self.model.max_position_embeddings,
             f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
             f"{self.model.max_position_embeddings}")
        need(bool(self.data.sources), "data.sources is empty; give at least one source")
        for s in self.data.sources:
            need(s.weight > 0, f"data source '{s.name}': weight must be positive, got {s.weight}")
            need(bool(s.paths), f"data source '{s.name}': paths is empty")
        need(len({s.name for s in self.data.sources}) == len(self.data.sources), "data source names must be unique")
        need(bool(self.tokenizer.path), "tokenizer.path is required")
        need(self.optim.decay in DECAYS, f"optim.decay must be one of {', '.join(DECAYS)}, got '{self.optim.decay}'")
        need(self.optim.lr > 0 and 0 <= self.optim.min_lr_ratio <= 1,
             "optim.lr must be positive and optim.min_lr_ratio in [0, 1]")
        need(self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        need(self.checkpoint.every > 0 and self.checkpoint.keep > 0, "checkpoint.every and checkpoint.keep must be positive")
        need(self.vocab_multiple > 0, "vocab_multiple must be positive")
        if self.eval is not None:
            self.eval.validate(need)
            seq = self.eval.seq_len or self.data.seq_len
            need(seq <= self.model.max_position_embeddings, f"eval.seq_len={seq} exceeds model.max_position_embeddings")
        return self


def _model_from_yaml(value) -> ModelConfig:
    if isinstance(value, ModelConfig):
        return value
    if isinstance(value, str):
        return load_model_config(value)
    if not isinstance(value, dict):
        raise ConfigError(f"model: expected a preset name or a mapping, got {value!r}")
    value = dict(value)
    preset = value.pop("preset", None)
    base = to_dict(load_model_config(preset)) if preset else {}
    return from_dict(ModelConfig, {**base, **value}, prefix="model.")


def train_config_from_dict(data: dict, overrides: list[str] = (), where: str = "train config") -> TrainConfig:
    data = dict(data)
    try:
        data["model"] = _model_from_yaml(data.get("model", "tiny"))
        cfg = from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return apply_overrides(cfg, list(overrides)).validate()


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    from rsdjax.config import preset_path

    path = preset_path("train", str(path))
    return train_config_from_dict(load_yaml(path), overrides, where=str(path))
