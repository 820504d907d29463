"""A compact LoRA fine-tuning loop: optax AdamW + warmup/cosine, a jitted step over LoRA params only.

The model is split three ways with NNX filters: `LoRAParam` (differentiated, updated, the only
thing in the optimizer state), `nnx.RngState` (dropout keys, advanced every step) and everything
else (the frozen base, passed to the step as a read-only input, so it stays bit-identical).
Every array keeps the sharding its logical axes give under the train rules.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.model.lora import LoRAParam
from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.rules import Rule, activation_sharding, resolve
from rsdjax.parallel.sharding import as_rules, param_name
from rsdjax.sft.config import OptimConfig


def make_optimizer(o: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping + AdamW on a linear-warmup / cosine-decay schedule."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, min(o.warmup_steps, o.steps), o.steps,
                                                  o.learning_rate * o.end_lr_ratio)
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
    return tx, schedule


def sft_loss(model, batch: dict) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over the answer tokens (`loss_mask`) of a packed batch."""
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    tokens = mask.sum()
    loss = (nll * mask).sum() / jnp.maximum(tokens, 1.0)
    return loss, {"loss": loss, "tokens": tokens}


def tree_shardings(tree, mesh, rules: str | Sequence[Rule]):
    """NamedShardings for a pytree of NNX variables (by `logical_axes`) and plain arrays (replicated)."""
    rules, shape = as_rules(rules), mesh_shape_of(mesh)

    def one(path, x):
        axes = x.get_metadata().get("logical_axes") if isinstance(x, nnx.Variable) else None
        spec = resolve(axes, x.shape, shape, rules, name=param_name(path)) if axes else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


class LoraTrainer:
    """Trains the LoRA factors of `model` (LoRA attached) in place.

    `step(batch)` runs one optimizer step and returns device metrics {loss, tokens, grad_norm};
    `evaluate(batches)` is the token-weighted mean loss with dropout off. After every step `model`
    holds the new LoRA arrays, so it can be evaluated, sampled or saved at any time.
    """

    def __init__(self, model, tx: optax.GradientTransformation, mesh, rules: str | Sequence[Rule] = "train"):
        self.model, self.tx, self.mesh, self.rules = model, tx, mesh, as_rules(rules)
        model.train()
        train_def = nnx.graphdef(model)
        model.eval()
        eval_def, params, rng, frozen = nnx.split(model, LoRAParam, nnx.RngState, ...)
        self.frozen = frozen
        param_sh = tree_shardings(params, mesh, self.rules)
        self.params = jax.device_put(params, param_sh)
        opt_state = tx.init(self.params)
        opt_sh = tree_shardings(opt_state, mesh, self.rules)
        self.opt_state = jax.device_put(opt_state, opt_sh)
        rng_sh = tree_shardings(rng, mesh, self.rules)
        self.rng = jax.device_put(rng, rng_sh)  # inputs sharded as the outputs will be: one compile
        replicated = NamedSharding(mesh, PartitionSpec())

        def train_step(params, opt_state, rng, frozen, batch):
            def loss_fn(params):
                # fresh RngState variables inside this trace, so dropout may advance their counter
                m = nnx.merge(train_def, params, jax.tree.map(lambda x: x, rng), frozen)
                loss, metrics = sft_loss(m, batch)
                return loss, (metrics, nnx.state(m, nnx.RngState))

            (_, (metrics, new_rng)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, new_rng, {**metrics, "grad_norm": optax.global_norm(grads)}

        def eval_step(params, rng, frozen, batch):
            return sft_loss(nnx.merge(eval_def, params, rng, frozen), batch)[1]

        self._train_step = jax.jit(train_step, donate_argnums=(0, 1, 2),
                                   out_shardings=(param_sh, opt_sh, rng_sh, replicated))
        self._eval_step = jax.jit(eval_step, out_shardings=replicated)

    def put_batch(self, batch: dict) -> dict:
        """Host arrays [B, T] -> device arrays sharded over the batch axes (data, fsdp)."""
        shape = mesh_shape_of(self.mesh)
        out = {}
        for k, v in batch.items():
            spec = resolve(("batch", "seq"), v.shape, shape, self.rules, name=f"batch['{k}'] (optim.batch_size)")
            out[k] = jax.device_put(np.asarray(v), NamedSharding(self.mesh, spec))
        return out

    def step(self, batch: dict) -> dict:
        with activation_sharding(self.mesh, self.rules):
            self.params, self.opt_state, self.rng, metrics = self._train_step(
                self.params, self.opt_state, self.rng, self.frozen, self.put_batch(batch))
        nnx.update(self.model, self.params, self.rng)
        return metrics

    def evaluate(self, batches: list[dict]) -> float:
        total, tokens = 0.0, 0.0
        with activation_sharding(self.mesh, self.rules):
            for batch in batches:
                m = jax.device_get(self._eval_step(self.params, self.rng, self.frozen, self.put_batch(batch)))
                total += float(m["loss"]) * float(m["tokens"])
                tokens += float(m["tokens"])
        return total / max(tokens, 1.0)


@dataclasses.dataclass
class TrainLog:
    """Metrics every `log_every` steps, printed and appended to a jsonl file."""

    path: Path | None
    log: Callable[[str], None] = print
    history: list[dict] = dataclasses.field(default_factory=list)
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def write(self, record: dict) -> None:
        record = {k: (round(float(v), 6) if isinstance(v, (float, np.floating, jax.Array)) else v)
                  for k, v in record.items()}
        record["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        self.history.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.log("  ".join(f"{k} {v}" for k, v in record.items()))
