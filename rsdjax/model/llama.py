"""Llama (2, 3, 3.1, 3.2) in Flax NNX, readable top to bottom.

Layout: decoder layers are stacked on a leading `layers` axis and run with `jax.lax.scan`, so one
layer compiles once and `layers` can be mapped to the `stage` mesh axis. Every parameter carries
`logical_axes` metadata; `rsdjax.parallel.sharding` turns those into PartitionSpecs.

Weights use HF's math exactly (rotate-half RoPE, RMSNorm in float32, GQA), so HF checkpoints load
with transposes and reshapes only.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsdjax.config import ModelConfig
from rsdjax.model.attention import attend_with, cache_mask, causal_mask
from rsdjax.model.axes import CACHE_AXES, PARAM_AXES  # noqa: F401  (CACHE_AXES: part of this module's API)
from rsdjax.model.lora import lora_delta
from rsdjax.model.lora_rows import lora_rows_delta
from rsdjax.model.projection import project
from rsdjax.model.quant import QArray, head_matmul
from rsdjax.parallel import layer_stack
from rsdjax.parallel.rules import constrain



def resolve_dtype(name: str):
    """The dtype policy: 'auto' is float32 on XLA:CPU (bf16 matmuls are slow there), bf16 elsewhere."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def mask_padded_vocab(cfg: ModelConfig, logits):
    """-inf for the rows padded on load (ids >= real_vocab_size), so they are never sampled or scored."""
    if cfg.real_vocab_size is None or cfg.real_vocab_size == cfg.vocab_size:
        return logits
    return jnp.where(jnp.arange(cfg.vocab_size) < cfg.real_vocab_size, logits, -jnp.inf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values for every layer: [layers, batch, cache_seq, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or resolve_dtype(cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


# ---------------------------------------------------------------- building blocks


def rms_norm(x, weight, eps: float):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies, with Llama-3.1 scaling when `rope_scaling` is set (HF 'llama3' rope)."""
    d = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32)
    if rs.rope_type != "llama3":
        raise ValueError(f"rope_scaling.rope_type '{rs.rope_type}' is not supported (only 'llama3')")
    old_len = rs.original_max_position_embeddings
    low_wavelen = old_len / rs.low_freq_factor
    high_wavelen = old_len / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions, inv_freq):
    """cos/sin tables [B, T, head_dim] in float32 for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x: [B, T, heads, head_dim]; HF's rotate-half convention."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def linear(x, p: dict, name: str, equation: str):
    """Every projection goes through here, so adapters (LoRA) have exactly one place to hook in."""
    y = project(equation, x, p[name])  # jnp.einsum with a CPU-friendly weight gradient (see projection.py)
    if name in p.get("lora", {}):  # LoRA arrays from `rsdjax.model.lora` (see `Llama.layer_params`)
        y = y + lora_delta(x, p["lora"], name, equation)
    if name in p.get("lora_rows", {}):  # multi-LoRA serving: each batch row its own adapter (rsdjax.infer.adapters)
        y = y + lora_rows_delta(x, p["lora_rows"], name, equation)
    return y


def decoder_layer(cfg: ModelConfig, x, p: dict, rope: tuple, attend, row_reduce=None):
    """One pre-norm Llama block. rope = (cos, sin) tables; `attend(q, k, v)` (see `attend_with`).

    `row_reduce` completes the row-parallel projections (wo, w_down): None when XLA partitions the
    layer from shardings; a psum over `tensor` in the shard_map path (rsdjax/parallel/tensor_parallel.py).
    """
    row_reduce = row_reduce or (lambda y: y)
    cos, sin = rope
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = apply_rope(linear(h, p, "wq", "bte,ehd->bthd"), cos, sin)
    k = apply_rope(linear(h, p, "wk", "bte,ehd->bthd"), cos, sin)
    v = linear(h, p, "wv", "bte,ehd->bthd")
    q = constrain(q, ("batch", "seq", "act_heads", None))
    attn = attend(q, k, v)
    x = x + row_reduce(linear(attn, p, "wo", "bthd,hde->bte"))
    x = constrain(x, ("batch", "seq", "act_embed"))

    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = linear(h, p, "w_gate", "bte,em->btm")
    up = linear(h, p, "w_up", "bte,em->btm")
    act = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
    x = x + row_reduce(linear(act, p, "w_down", "btm,me->bte"))
    return constrain(x, ("batch", "seq", "act_embed"))


# ---------------------------------------------------------------- around the layers (every runner uses these)


def embed_tokens(cfg: ModelConfig, table, tokens):
    """tokens [B, T] -> activations [B, T, E] in the compute dtype."""
    x = jnp.take(table, tokens, axis=0).astype(resolve_dtype(cfg.dtype))
    return constrain(x, ("batch", "seq", "act_embed"))


def rope_tables(cfg: ModelConfig, positions) -> tuple:
    """(cos, sin) [B, T, head_dim] for integer positions [B, T]."""
    return rope_cos_sin(positions, rope_inv_freq(cfg))


def lm_logits(cfg: ModelConfig, x, final_norm, head):
    """x [B, (T,) E] -> float32 logits [B, (T,) V]. head [vocab, embed] (the embedding when tied)."""
    x = rms_norm(x, final_norm.astype(x.dtype), cfg.rms_norm_eps)
    if isinstance(head, QArray):  # int8 (rsdjax/model/quant.py)
        logits = head_matmul(x, head)
    else:
        logits = jnp.einsum("...e,ve->...v", x, head.astype(x.dtype), preferred_element_type=jnp.float32)
    return constrain(mask_padded_vocab(cfg, logits), ("batch",) + ("seq",) * (x.ndim - 2) + ("act_vocab",))


def layer_scan(cfg: ModelConfig, params: dict, x, aux: tuple, cache: tuple = (), tp=None):
    """x [B, T, E] through the stacked layers `params` with `jax.lax.scan`: the model's own loop, and
    what each stage (or tensor shard) runs inside `rsdjax.parallel.layer_stack`.

    aux = (cos, sin, mask) plus `positions` [B, T] when `cache` = (k, v) [L, B, S, KV, D] is given:
    each layer writes its keys/values there at `positions` (dropped past the end) and attends to
    them. `tp`: the tensor-parallel hooks inside a tensor-manual shard_map. Returns (x, cache).
    """
    cos, sin, mask = aux[:3]
    select = tp.select_kv_heads if tp else None
    row_reduce = tp.row_reduce if tp else None
    if not cache:
        def body(x, p):
            return decoder_layer(cfg, x, p, (cos, sin), attend_with(mask, select), row_reduce), None

        body = jax.checkpoint(body) if cfg.remat else body
        return jax.lax.scan(body, x, params, unroll=1 if cfg.scan_layers else True)[0], ()

    positions = aux[3]
    rows = jnp.arange(x.shape[0])[:, None]

    def cached_body(carry, layer):
        x, k_all, v_all = carry
        p, i = layer

        def store(k, v):
            nonlocal k_all, v_all
            k_all = k_all.at[i, rows, positions].set(k.astype(k_all.dtype), mode="drop")
            v_all = v_all.at[i, rows, positions].set(v.astype(v_all.dtype), mode="drop")
            return select(k_all[i], v_all[i]) if select else (k_all[i], v_all[i])

        x = decoder_layer(cfg, x, p, (cos, sin), attend_with(mask, store), row_reduce)
        return (x, k_all, v_all), None

    k_all, v_all = cache
    (x, k_all, v_all), _ = jax.lax.scan(cached_body, (x, k_all, v_all), (params, jnp.arange(k_all.shape[0])))
    return x, (k_all, v_all)


# ---------------------------------------------------------------- the model


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=None):
        self.cfg = cfg
        pdt = param_dtype or resolve_dtype(cfg.param_dtype)
        e, m, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        shapes = {
            "embed": (cfg.vocab_size, e), "final_norm": (e,),
            "attn_norm": (l, e), "mlp_norm": (l, e),
            "wq": (l, e, h, d), "wk": (l, e, kv, d), "wv": (l, e, kv, d), "wo": (l, h, d, e),
            "w_gate": (l, e, m), "w_up": (l, e, m), "w_down": (l, m, e),
        }
        if not cfg.tie_word_embeddings:
            shapes["lm_head"] = (e, cfg.vocab_size)
        normal = nnx.initializers.normal(stddev=0.02)
        for name, shape in shapes.items():
            value = jnp.ones(shape, pdt) if name.endswith("norm") else normal(rngs.params(), shape, pdt)
            setattr(self, name, nnx.Param(value, logical_axes=PARAM_AXES[name]))

    @property
    def layer_param_names(self) -> tuple[str, ...]:
        return tuple(n for n, axes in PARAM_AXES.items() if axes[0] == "layers")

    def layer_params(self) -> dict:
        """Stacked per-layer arrays (plus adapters, if any were attached by `rsdjax.model.lora`).

        Every leaf leads with `layers`, so `jax.lax.scan` hands one layer's slice to `decoder_layer`.
        """
        params = {n: getattr(self, n).get_value() for n in self.layer_param_names}  # (a shape-only model too)
        lora = getattr(self, "lora", None)  # set by `rsdjax.model.lora.attach_lora`
        if lora is not None and not lora.merged:
            params["lora"] = lora.layer_arrays()  # arrays only (A, B, scale, dropout keys): no callables
        return params

    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None):
        """tokens [B, T] int32 -> logits [B, T, V] (and the updated cache when one is given).

        Without a cache: causal attention within the T tokens; `segment_ids` [B, T] keeps packed
        examples from attending to each other. With a cache: keys/values are written at `positions`
        and each token attends to every cached position <= its own (slots may be at different lengths).
        """
        cfg = self.cfg
        dtype = resolve_dtype(cfg.dtype)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = embed_tokens(cfg, self.embed[...], tokens)
        params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                              self.layer_params())
        if cache is None:
            aux, kv = (*rope_tables(cfg, positions), causal_mask(b, t, segment_ids)), ()
        else:
            aux, kv = (*rope_tables(cfg, positions), cache_mask(positions, cache.k.shape[2]), positions), (cache.k, cache.v)
        # None: the plain scan. On a mesh with stage > 1 (pipeline) or with tensor_parallel=shard_map,
        # rsdjax/parallel/layer_stack.py runs the same `layer_scan` per stage / tensor shard instead.
        stack = layer_stack.custom_runner(cfg)
        run = functools.partial(layer_scan, cfg)
        if stack is None:
            x, kv = run(params, x, aux, kv)
        else:
            x, kv = stack.run(run, x, params, aux, PARAM_AXES, kv, CACHE_AXES)

        head = self.embed[...] if cfg.tie_word_embeddings else self.lm_head[...].T
        logits = lm_logits(cfg, x, self.final_norm[...], head)
        return logits if cache is None else (logits, KVCache(*kv))
