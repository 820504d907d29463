"""`finetune(cfg)`: base model + Q&A jsonl -> a PEFT LoRA adapter directory.

Output directory layout (PEFT's, plus our logs):
    adapter_config.json, adapter_model.safetensors   the adapter (loadable by peft and rsdjax)
    metrics.jsonl                                    one line per logged step
    finetune_config.json                             the resolved config
    checkpoint-{step}/                               intermediate adapters when save_every > 0
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from rsdjax.checkpoint.peft import CONFIG_FILE, save_adapter
from rsdjax.config import ConfigError, to_dict
from rsdjax.model.lora import attach_lora
from rsdjax.sft.config import FinetuneConfig
from rsdjax.sft.data import batches, eval_batches, load_examples
from rsdjax.sft.generate import answer
from rsdjax.sft.loop import LoraTrainer, TrainLog, make_optimizer
from rsdjax.tokenizer import Tokenizer


@dataclasses.dataclass
class FinetuneResult:
    model: object  # the base Llama with the trained LoRA attached (eval mode)
    tokenizer: Tokenizer
    adapter_dir: Path
    history: list[dict]  # logged metrics
    eval_loss_before: float | None
    eval_loss_after: float | None
    answers_before: list[str]  # greedy answers to cfg.demo_questions
    answers_after: list[str]
    seconds: float


def finetune(cfg: FinetuneConfig, mesh=None, log: Callable[[str], None] = print) -> FinetuneResult:
    """Train a LoRA adapter as `cfg` says and save it; see `FinetuneResult`."""
    from rsdjax.loading import load_model
    from rsdjax.parallel.mesh import make_mesh

    t0 = time.perf_counter()
    cfg.validate()
    out = Path(cfg.output)
    if (out / CONFIG_FILE).exists():
        raise ConfigError(f"output {out} already holds an adapter; choose another output= (nothing was changed)")
    mesh = mesh if mesh is not None else make_mesh({})
    tokenizer = Tokenizer.load(cfg.tokenizer or cfg.base)
    model = load_model(cfg.base, mesh=mesh, rules="train")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's "
                          f"vocab_size={model.cfg.vocab_size} (wrong tokenizer for {cfg.base}?)")
    d, o = cfg.data, cfg.optim
    if d.seq_len > model.cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds the model's max_position_embeddings="
                          f"{model.cfg.max_position_embeddings}")
    train, stats = load_examples(d.train, tokenizer, d.seq_len, d.template)
    log(f"data {d.train}: {stats}")
    evals = eval_batches(load_examples(d.eval, tokenizer, d.seq_len, d.template)[0], d.seq_len, o.batch_size,
                         d.pack) if d.eval else []

    attach_lora(model, cfg.lora, seed=cfg.seed)
    n_lora = sum(v[...].size for v in [*model.lora.a.values(), *model.lora.b.values()])
    log(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {sorted(model.lora.layers)}: {n_lora:,} trainable "
        f"parameters ({n_lora / model.cfg.num_params():.3%} of the base)")
    questions = list(cfg.demo_questions)
    before = answer(model, tokenizer, questions, d.template, cfg.max_new_tokens)  # B = 0: the base model

    tx, schedule = make_optimizer(o)
    trainer = LoraTrainer(model, tx, mesh)
    held_out = None
    if cfg.eval is not None:
        from rsdjax.eval.held_out import HeldOut

        e = cfg.eval
        held_out = HeldOut(e, tokenizer, model, mesh, seq_len=e.seq_len or d.seq_len,
                           batch_size=e.batch_size or o.batch_size, total_steps=o.steps, template=d.template)

    def held_out_record(step: int) -> dict:
        if held_out is None or not held_out.due(step, fresh_start=True):
            return {}
        results = held_out.run(held_out.step.state_of(model))
        return {f"eval_{name}_{k}": r[k] for name, r in results.items() for k in ("loss", "bits_per_byte")}

    eval_before = trainer.evaluate(evals) if evals else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_config.json").write_text(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False))
    logger = TrainLog(out / "metrics.jsonl", log)
    first = ({"eval_loss": eval_before} if eval_before is not None else {}) | held_out_record(0)
    if first:
        logger.write({"step": 0, **first})
    data = batches(train, d.seq_len, o.batch_size, seed=cfg.seed, pack_examples=d.pack)
    for step in range(1, o.steps + 1):
        metrics = trainer.step(next(data))
        if step % cfg.log_every == 0 or step == o.steps:
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "lr": float(schedule(step - 1))}
            if evals and cfg.eval_every and step % cfg.eval_every == 0:
                record["eval_loss"] = trainer.evaluate(evals)
            logger.write(record | (held_out_record(step) if step != o.steps else {}))
        elif step != o.steps and held_out is not None and held_out.due(step):
            logger.write({"step": step, **held_out_record(step)})
        if cfg.save_every and step % cfg.save_every == 0 and step != o.steps:
            save_adapter(model, out / f"checkpoint-{step}", base_model_name_or_path=cfg.base)
    eval_after = trainer.evaluate(evals) if evals else None
    last = ({"eval_loss": eval_after} if eval_after is not None else {}) | held_out_record(o.steps)
    if last:
        logger.write({"step": o.steps, **last})
    save_adapter(model, out, base_model_name_or_path=cfg.base)
    model.eval()
    after = answer(model, tokenizer, questions, d.template, cfg.max_new_tokens)
    return FinetuneResult(model, tokenizer, out, logger.history, eval_before, eval_after, before, after,
                          time.perf_counter() - t0)
