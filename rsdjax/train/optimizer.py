"""AdamW with gradient clipping and a warm-up + decay schedule (re-warmed at each stage).

Continual pre-training starts from a trained model whose learning rate had decayed to ~0; it is
warmed up again (linearly, from lr/warmup to lr) before decaying to `lr * min_lr_ratio`, which
Gupta et al. (2023, "Continual Pre-Training of Large Language Models: How to (re)warm your
model?") found to work better than continuing at a low rate. Each stage (embeddings-only, then all
parameters) gets its own warm-up and decay over its own length.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from rsdjax.train.config import OptimConfig


def lr_schedule(o: OptimConfig, steps: int):
    """lr(step) for a stage of `steps` updates; step counts from 0 within the stage."""
    warm = min(o.warmup_steps, steps)
    peak, end = o.lr, o.lr * o.min_lr_ratio
    decay_len = max(steps - warm, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        t = jnp.clip((s - warm) / decay_len, 0.0, 1.0)
        if o.decay == "cosine":
            decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        elif o.decay == "linear":
            decayed = peak + (end - peak) * t
        else:
            decayed = jnp.full_like(t, peak)
        return jnp.where(s < warm, peak * (s + 1.0) / max(warm, 1), decayed)

    return schedule


def _decay_mask(params):
    """Weight decay on weight matrices only, not on norm scales (stacked norms are 2-D, so go by name)."""
    def decays(path, p):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        return p.ndim >= 2 and not name.endswith("norm")

    return jax.tree.map_with_path(decays, params)


def rows_from(first: int) -> optax.GradientTransformation:
    """Zero the updates of embedding rows (LM-head columns) below `first`.

    Adam moves every row it gets a gradient for by about the learning rate, and through the softmax
    every row of the embedding (and of a tied LM head) gets one; chained after AdamW (weight decay
    included), this keeps the old tokens exactly as the base model had them while the new ones learn."""
    def keep(path, u):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        if name == "embed":
            return u * (jnp.arange(u.shape[0]) >= first)[:, None].astype(u.dtype)
        if name == "lm_head":
            return u * (jnp.arange(u.shape[1]) >= first)[None, :].astype(u.dtype)
        return u

    return optax.stateless(lambda updates, params=None: jax.tree.map_with_path(keep, updates))


def make_optimizer(o: OptimConfig, steps: int, first_row: int | None = None):
    """(optax transformation, schedule) for one stage of `steps` updates; `first_row`: update only the
    embedding rows from there on (`rows_from`)."""
    schedule = lr_schedule(o, steps)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=_decay_mask))
    if first_row is not None:
        parts.append(rows_from(first_row))
    return optax.chain(*parts), schedule
