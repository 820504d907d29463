"""`finetune(cfg)`: base model + Q&A jsonl -> a PEFT LoRA adapter directory, on the training system.

The step is `rsdjax.train.step.TrainStep` with the LoRA factors as the trainable set (the base is
frozen: passed in, never updated, so it stays bit-identical) and SFT batches (loss on the answers);
the optimizer and schedule are `rsdjax.train.optimizer`'s; checkpoints are the training loop's
Orbax ones (adapter, optimizer state, step, RNG, data position). Re-running the same command after
an interruption, SIGKILL included, resumes from the last complete checkpoint and ends with the same
bits as an uninterrupted run.

Output directory layout (PEFT's, plus ours):
    adapter_config.json, adapter_model.safetensors   the adapter (loadable by peft and rsdjax)
    metrics.jsonl                                    one line per step (eval_loss where evaluated)
    finetune_config.json                             the resolved config
    checkpoints/                                     Orbax checkpoints for resuming (checkpoint.dir)
    checkpoint-{step}/                               intermediate adapters when save_every > 0
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import jax
from flax import nnx

from rsdjax.checkpoint.peft import CONFIG_FILE, save_adapter
from rsdjax.config import ConfigError, to_dict
from rsdjax.model.lora import LoRAParam, attach_lora
from rsdjax.parallel.sharding import from_host
from rsdjax.sft.answers import answer
from rsdjax.sft.config import FinetuneConfig
from rsdjax.sft.data import batches, eval_batches, load_examples
from rsdjax.tokenizer import Tokenizer
from rsdjax.train.checkpoint import RUN_FILE, TrainCheckpointer, architecture
from rsdjax.train.metrics import MetricsLogger, flops_per_token
from rsdjax.train.optimizer import make_optimizer
from rsdjax.train.step import TrainState, TrainStep, check_batch, lm_loss


@dataclasses.dataclass
class FinetuneResult:
    model: object  # the base Llama with the trained LoRA attached (eval mode)
    tokenizer: Tokenizer
    adapter_dir: Path
    history: list[dict]  # logged metrics of the steps this call ran
    eval_loss_before: float | None
    eval_loss_after: float | None
    answers_before: list[str]  # greedy answers to cfg.demo_questions
    answers_after: list[str]
    seconds: float
    already_complete: bool = False  # the output already held this run's final adapter: nothing was done


def sft_loss(model, batch: dict, rng):
    """The LM loss on the answer tokens (`loss_mask`); LoRA dropout draws from this step's key."""
    lora = getattr(model, "lora", None)
    if lora is not None:
        lora.rngs = nnx.Rngs(dropout=rng)  # inside the step's trace: a fresh stream per step (and micro-batch)
    return lm_loss(model, batch, rng)


def finetune(cfg: FinetuneConfig, mesh=None, log: Callable[[str], None] = print) -> FinetuneResult:
    """Train (or resume training) a LoRA adapter as `cfg` says and save it; see `FinetuneResult`."""
    from rsdjax.eval.step import EvalStep
    from rsdjax.loading import load_model
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.train.loop import check_resumable, join_params

    t0 = time.perf_counter()
    cfg.validate()
    out = Path(cfg.output)
    ckpt_dir = cfg.checkpoint_dir.absolute()
    if (out / CONFIG_FILE).exists() and not (ckpt_dir / RUN_FILE).exists():
        raise ConfigError(f"output {out} already holds an adapter that this run did not write; choose another "
                          "output= (nothing was changed)")
    mesh = mesh if mesh is not None else make_mesh({})
    check_batch(cfg.batch_size, cfg.grad_accum, mesh)
    tokenizer = Tokenizer.load(cfg.tokenizer or cfg.base)
    model = load_model(cfg.base, mesh=mesh, rules="train")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's "
                          f"vocab_size={model.cfg.vocab_size} (wrong tokenizer for {cfg.base}?)")
    d = cfg.data
    if d.seq_len > model.cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds the model's max_position_embeddings="
                          f"{model.cfg.max_position_embeddings}")
    train, stats = load_examples(d.train, tokenizer, d.seq_len, d.template)
    log(f"data {d.train}: {stats}")
    evals = eval_batches(load_examples(d.eval, tokenizer, d.seq_len, d.template)[0], d.seq_len, cfg.batch_size,
                         d.pack) if d.eval else []

    attach_lora(model, cfg.lora, seed=cfg.seed)
    n_lora = sum(v[...].size for v in [*model.lora.a.values(), *model.lora.b.values()])
    log(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {sorted(model.lora.layers)}: {n_lora:,} trainable "
        f"parameters ({n_lora / model.cfg.num_params():.3%} of the base)")
    arch = architecture(model.cfg)
    ckpt = TrainCheckpointer(ckpt_dir, arch, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                             async_save=cfg.checkpoint.async_save, is_writer=jax.process_index() == 0)
    try:
        latest = ckpt.latest_step() or 0
        if latest > cfg.steps:
            raise ConfigError(f"{ckpt_dir} holds step {latest}, past steps={cfg.steps}; raise steps or use another output=")
        if latest == cfg.steps and (out / CONFIG_FILE).exists():
            log(f"{out}: already complete at step {latest} (choose another output= to train again)")
            return FinetuneResult(model, tokenizer, out, [], None, None, [], [], time.perf_counter() - t0, True)
        questions = list(cfg.demo_questions)
        before = answer(model, tokenizer, questions, d.template, cfg.max_new_tokens, mesh)  # B = 0: the base

        model.train()  # LoRA dropout on in the step's graph
        tx, schedule = make_optimizer(cfg.optim, cfg.steps)
        ts = TrainStep(model, tx, mesh, trainable=LoRAParam, grad_accum=cfg.grad_accum, loss_fn=sft_loss,
                       schedule=schedule)
        evaluator = EvalStep(model, mesh, batch_size=cfg.batch_size) if evals else None

        held_out = None
        if cfg.eval is not None:
            from rsdjax.eval.held_out import HeldOut

            e = cfg.eval
            held_out = HeldOut(e, tokenizer, model, mesh, seq_len=e.seq_len or d.seq_len,
                               batch_size=e.batch_size or cfg.batch_size, total_steps=cfg.steps, template=d.template)

        def eval_loss(state: TrainState, frozen: dict) -> float:
            full = join_params(state.params, frozen)
            rows = [evaluator(full, batch) for batch in evals]
            return float(sum(r[0].sum() for r in rows) / max(sum(r[1].sum() for r in rows), 1.0))

        def evaluate_held_out(step: int, state: TrainState) -> None:
            if held_out is not None and held_out.due(step, fresh_start=latest == 0):
                metrics.log_eval(step, lambda: held_out.run(join_params(state.params, frozen)))

        params, frozen = ts.split(model)
        if latest == 0:
            state = ts.init(params, step=0, seed=cfg.seed)
        else:
            check_resumable(ckpt.read_meta(latest), cfg, f"{ckpt.directory}/{latest}")
            abstract = {"params": ts.abstract_state.params, "opt_state": ts.abstract_state.opt_state,
                        "step": ts.abstract_state.step, "rng": ts.abstract_state.rng}
            tree = ckpt.restore(latest, abstract)
            state = TrainState(tree["step"], tree["params"], tree["opt_state"], tree["rng"])
            log(f"resumed from {ckpt.directory}/{latest}")
        eval_before = eval_loss(state, frozen) if evals else None
        eval_after = None
        if jax.process_index() == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "finetune_config.json").write_text(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False))
        metrics = MetricsLogger(out, cfg.steps, latest, tokens_per_step=cfg.batch_size * d.seq_len,
                                flops_per_token=flops_per_token(model.cfg, d.seq_len), peak_flops=None,
                                enabled=jax.process_index() == 0, tensorboard=False, print_every=cfg.log_every)
        data = batches(train, d.seq_len, cfg.batch_size, seed=cfg.seed, pack_examples=d.pack)
        for _ in range(latest):  # the data position: the batches the restored steps consumed
            next(data)
        try:
            evaluate_held_out(latest, state)
            metrics.start_clock()
            for step in range(latest + 1, cfg.steps + 1):
                batch = {k: from_host(v, ts.batch_sharding) for k, v in next(data).items()}
                state, m = ts(state, frozen, batch)
                # logs the previous step (no host wait for this one: the next batch loads while it runs)
                metrics.log_after_next(step, m)
                if evals and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    row = metrics.flush(late=lambda: {"eval_loss": eval_loss(state, frozen)})
                    if step == cfg.steps:
                        eval_after = row["eval_loss"]
                evaluate_held_out(step, state)
                if ckpt.due(step) or step == cfg.steps:
                    metrics.flush()  # every saved step has its metrics line (resume cuts later ones)
                    tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}
                    ckpt.save(step, tree, {"data_position": step, "stage": "lora", "model": arch,
                                           "batch_size": cfg.batch_size, "seq_len": d.seq_len})
                if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
                    if not (out / f"checkpoint-{step}" / CONFIG_FILE).exists():  # an earlier attempt wrote it
                        save_adapter(ts.merge(state.params, frozen), out / f"checkpoint-{step}",
                                     base_model_name_or_path=cfg.base, write=jax.process_index() == 0)
        finally:
            metrics.close()
        ckpt.wait()
    finally:
        ckpt.close()
    trained = ts.merge(state.params, frozen)
    if evals and eval_after is None:  # the last step ran in an earlier attempt
        eval_after = eval_loss(state, frozen)
    save_adapter(trained, out, base_model_name_or_path=cfg.base, write=jax.process_index() == 0)
    after = answer(trained, tokenizer, questions, d.template, cfg.max_new_tokens, mesh)
    return FinetuneResult(trained, tokenizer, out, metrics.rows, eval_before, eval_after, before, after,
                          time.perf_counter() - t0)
