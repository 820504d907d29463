"""The Llama forward pass laid out for serving: per-layer weights, a per-layer KV cache, prefill and decode.

Training keeps the layers stacked (`[layers, ...]`) and runs them with `jax.lax.scan`. For decoding
that layout costs a copy: inside a scan XLA slices each layer's weights out of the stack into a
temporary buffer before the matmul, so every decode step reads the weights twice and writes them
once (measured ~2x slower on XLA:CPU, where decoding is memory bound). Here the weights are split
once into one array per layer, the layer loop is unrolled, and each layer's K/V cache is its own
donated buffer that decode updates in place. Everything else is the model's (`embed_tokens`,
`rope_tables`, the masks, `decoder_layer` with its `attend` hook, `lm_logits`), so the math, the
LoRA hook in `linear` and the sharding constraints are shared with training; only the cache layout
is this module's. `tests/test_infer_forward.py` checks the logits against the model's own
full forward pass.

Cache layout: a layer is `[slots, kv_heads, max_context, head_dim]` (logical axes `(batch,
act_kv_heads, cache_seq, head_dim)`: slots over `data`, kv heads over `tensor` when they divide it,
replicated otherwise, as vLLM does). Heads before positions, unlike the model's `KVCache`, so that
the attention matmuls see (batch, kv head) as leading batch dimensions and contract the minor
dimension: with `[slots, positions, heads, dim]` XLA:CPU transposes the whole cache of every layer
on every step before the matmul (measured: about as many bytes as the weights at 16 slots).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.config import ConfigError, ModelConfig
from rsdjax.infer.sampling import token_logprobs
from rsdjax.model.attention import attend_with, cache_mask, causal_mask
from rsdjax.model.llama import Llama, decoder_layer, embed_tokens, lm_logits, resolve_dtype, rope_tables
from rsdjax.model.quant import INT8, INT8_ORDER, QArray, transpose
from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.rules import INFER_RULES, constrain, resolve
from rsdjax.parallel.sharding import jit_or_shapes, program_or_shapes

CACHE_LAYER_AXES = ("batch", "act_kv_heads", "cache_seq", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ServingWeights:
    """The model's weights in compute dtype, the decoder layers as a list of per-layer dicts, each
    projection in its stored layout (`LAYOUTS[layout]`; `layer_view` gives the model's)."""

    embed: jax.Array  # [vocab, embed]
    final_norm: jax.Array  # [embed]
    lm_head: jax.Array | None  # stored [vocab, embed], HF's layout; None when tied to `embed`
    layers: list[dict]
    # a key of LAYOUTS; "int8" once quantized (`quantize_serving`: every kernel in quant.INT8_ORDER)
    layout: str = dataclasses.field(default="matmul", metadata=dict(static=True))

    def stored_order(self, name: str) -> tuple[int, ...] | None:
        """The permutation from the model's layout of float kernel `name` to the stored one (None: the same)."""
        return stored_orders(self.layout).get(name)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """K and V for every layer: lists of `[batch, kv_heads, length, head_dim]` arrays."""

    k: list[jax.Array]
    v: list[jax.Array]


class StageNotSupportedError(ConfigError):
    pass


def model_mesh(model: Llama):
    """The mesh the model's weights live on (None if they are plain single-device arrays)."""
    sharding = getattr(model.embed[...], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


# Stored layouts (axis permutations: the model's per-layer layout -> the stored one), one per kind
# of step XLA:CPU is fastest at; `layer_view` hands the layer a transposed view that XLA folds into
# the matmul. Measured on an AVX-512 EPYC, 2 cores, f32 (scripts/bench_layouts.py: both in one process):
# - "matmul" (the default): the MLP kernels as the model keeps them, [in, out]. Steps of several
#   rows: SmolLM2-135M's paged decode step of 8 rows 38.6 -> 29.9 ms against "matvec", of 32 rows
#   83.5 -> 75.6 ms; prompt chunks the same.
# - "matvec": the MLP kernels [out, in], HF's nn.Linear layout, which one row a step (decode at
#   batch 1) reads as a matrix-vector loop: 11.7 ms a token against 14.0 ms for "matmul" (the 125M
#   scripts/bench_infer.py model). Engines with one slot use it (`layout_for`). On an earlier
#   machine it was the faster one at 16 rows too: the CPU's matmul library decides, not the math.
# Both: the attention kernels keep [in, out] (their heads are a separate dim, and for those XLA
# copied a transposed view to a plain matrix on every step); `wo` is [head_dim, heads, embed], since
# "bthd,hde->bte" contracts (d, h) in that order (jnp.einsum sorts contracted names), and as
# [heads, head_dim, embed] XLA copies it to flatten it. int8 kernels have their own layout
# (`rsdjax.model.quant.INT8_ORDER`), whichever float layout they were quantized from.
_WO = {"wo": (1, 0, 2)}  # [heads, head_dim, embed] -> [head_dim, heads, embed]
LAYOUTS = {
    "matmul": _WO,
    "matvec": {**_WO, "w_gate": (1, 0), "w_up": (1, 0), "w_down": (1, 0)},  # [in, out] -> [out, in]
}


def layout_for(max_rows: int) -> str:
    """The stored layout for an engine whose steps run up to `max_rows` decode rows."""
    return "matvec" if max_rows == 1 else "matmul"


def stored_orders(layout: str) -> dict[str, tuple[int, ...]]:
    """The permutation of each float kernel stored in `layout` (int8 weights: none, every kernel a QArray)."""
    return {} if layout == INT8 else LAYOUTS[layout]


def layer_view(p: dict, layout: str) -> dict:
    """One layer's stored weights (`ServingWeights.layout`) in the layout `decoder_layer` expects
    (transposed views)."""
    stored = stored_orders(layout)
    out = {}
    for name, w in p.items():
        order = INT8_ORDER.get(name) if isinstance(w, QArray) else stored.get(name)
        out[name] = w if order is None else transpose(w, tuple(int(i) for i in np.argsort(order)))
    return out


def serving_weights(model: Llama, mesh, layout: str = "matmul") -> ServingWeights:
    """Split the stacked layer weights into per-layer arrays in the stored `layout` (a key of
    `LAYOUTS`), each keeping its shard layout (the same mesh axes on the same logical dims).

    Done by one compiled per-layer program, run for each layer (peak memory: both layouts). The
    engine keeps only these; the stacked arrays are freed when the caller drops the model. A
    shape-only model (`sharded_abstract_model`) gives shape-only weights with the same shardings,
    for `rsdjax plan --aot`.
    """
    cfg = model.cfg
    dtype = resolve_dtype(cfg.dtype)
    stacked = model.layer_params()

    def layer_spec(path, a) -> tuple:
        spec = a.sharding.spec if isinstance(getattr(a, "sharding", None), NamedSharding) else PartitionSpec()
        if spec and spec[0] is not None:
            name = ".".join(str(getattr(k, "key", k)) for k in path)
            raise StageNotSupportedError(
                f"{name}: layers are sharded over '{spec[0]}' (pipeline stages), which the inference engine "
                "does not do: use a mesh with stage=1 (put those devices on data or tensor)")
        rest = tuple(spec[1:])
        return rest + (None,) * (a.ndim - 1 - len(rest))  # full length, so it can be permuted

    def named(spec: tuple) -> NamedSharding:
        while spec and spec[-1] is None:
            spec = spec[:-1]
        return NamedSharding(mesh, PartitionSpec(*spec))

    def same_sharding(a):
        s = getattr(a, "sharding", None)
        return s if isinstance(s, NamedSharding) else NamedSharding(mesh, PartitionSpec())

    specs = jax.tree.map_with_path(layer_spec, stacked)
    stored = LAYOUTS[layout]
    for name, order in stored.items():
        specs[name] = tuple(specs[name][i] for i in order)
    per_layer = jax.tree.map(named, specs, is_leaf=lambda x: isinstance(x, tuple))
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    head = None if cfg.tie_word_embeddings else model.lm_head.get_value()
    globals_ = (model.embed.get_value(), model.final_norm.get_value(), head)

    # one layer's program, run once per layer: compiling all layers in one program (270 outputs for
    # SmolLM2-135M) took 2.2 s of a cold `rsdjax generate`
    def take_layer(stacked, i):
        layer = jax.tree.map(lambda a: cast(jax.lax.dynamic_index_in_dim(a, i, keepdims=False)), stacked)
        for name, order in stored.items():
            layer[name] = jnp.transpose(layer[name], order)
        return layer

    def lay_out_globals(globals_):
        embed, final_norm, head = jax.tree.map(cast, globals_)
        return embed, final_norm, None if head is None else head.T  # lm_head stored [vocab, embed]

    head_sharding = None
    if head is not None:  # the stored [vocab, embed] head keeps the sharding of the model's [embed, vocab]
        spec = tuple(same_sharding(head).spec) + (None,) * 2
        head_sharding = named((spec[1], spec[0]))
    named_as = f"{layout}-{jnp.dtype(dtype).name}"  # what the programs close over besides their arguments
    take = program_or_shapes(take_layer, per_layer, stacked, np.int32(0), stored_as=f"serving_layer-{named_as}")
    layers = [take(stacked, np.int32(i)) for i in range(cfg.num_layers)]
    embed, final_norm, head = jit_or_shapes(
        lay_out_globals, (same_sharding(globals_[0]), same_sharding(globals_[1]), head_sharding), globals_,
        stored_as=f"serving_globals-{named_as}")
    return ServingWeights(embed, final_norm, head, layers, layout)


def cache_sharding(cfg: ModelConfig, mesh, batch: int, length: int) -> NamedSharding:
    shape = (batch, cfg.num_kv_heads, length, cfg.resolved_head_dim)
    return NamedSharding(mesh, resolve(CACHE_LAYER_AXES, shape, mesh_shape_of(mesh), INFER_RULES, name="kv cache"))


def cache_shardings(cfg: ModelConfig, mesh, batch: int, length: int) -> LayerCache:
    s = cache_sharding(cfg, mesh, batch, length)
    return LayerCache([s] * cfg.num_layers, [s] * cfg.num_layers)


def put_rows(dst: jax.Array, src: jax.Array, row, slot) -> jax.Array:
    """Row `row` of a prefill's layer cache [rows, KV, bucket, D] into slot `slot` of the engine's."""
    return jax.lax.dynamic_update_slice(dst, jax.lax.dynamic_slice_in_dim(src, row, 1, 0), (slot, 0, 0, 0))


def empty_cache(cfg: ModelConfig, mesh, batch: int, length: int) -> LayerCache:
    """Zeros, created directly on their shards."""
    sharding = cache_sharding(cfg, mesh, batch, length)
    shape = (batch, cfg.num_kv_heads, length, cfg.resolved_head_dim)
    dtype = resolve_dtype(cfg.dtype)
    make = jax.jit(lambda: [jnp.zeros(shape, dtype) for _ in range(2 * cfg.num_layers)],
                   out_shardings=[sharding] * (2 * cfg.num_layers))
    arrays = make()
    return LayerCache(arrays[:cfg.num_layers], arrays[cfg.num_layers:])


# ---------------------------------------------------------------- the two passes (pure; the engine jits them)


def _logits(cfg: ModelConfig, w: ServingWeights, x):
    """x [B, E] -> float32 logits [B, V]."""
    return lm_logits(cfg, x, w.final_norm, w.embed if w.lm_head is None else w.lm_head)


def with_adapters(w: ServingWeights, lora, i: int) -> dict:
    """Layer i's weights in the model's layout, plus its rows of the adapter pool when serving many
    LoRA adapters (`lora` = (per-layer pool arrays, adapter index per batch row); see `rsdjax.infer.adapters`)."""
    return layer_with_adapters(w.layers[i], w.layout, adapter_rows(lora, i))


def adapter_rows(lora, i: int) -> dict | None:
    """Layer i's part of the step's `lora` argument (None: every row on the base model)."""
    if lora is None:
        return None
    layers, index = lora
    return {**layers[i], "index": index}


def layer_with_adapters(stored: dict, layout: str, rows: dict | None) -> dict:
    """One layer's stored weights as `decoder_layer` takes them, with its adapter rows (`adapter_rows`)."""
    p = layer_view(stored, layout)
    if rows is not None:
        p["lora_rows"] = rows
    return p


def prefill(cfg: ModelConfig, w: ServingWeights, tokens, lengths, return_hidden: bool = False, lora=None):
    """Run padded prompts. tokens [B, T] (real tokens first, padding after), lengths [B].

    Returns the logits of each prompt's last real token [B, V] and the K/V of all T positions
    (padding positions hold garbage that decode never attends to: it attends to positions <= its
    own and overwrites position `length` onwards as it goes); with `return_hidden`, also the last
    layer's output at every position [B, T, E] (for prompt logprobs, see `prompt_logprobs`).
    """
    b, t = tokens.shape
    rope = rope_tables(cfg, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    mask = causal_mask(b, t)
    x = embed_tokens(cfg, w.embed, tokens)
    ks, vs = [], []
    for i in range(len(w.layers)):
        def keep(k, v):  # [B, T, KV, D] -> the cache layout [B, KV, T, D]
            ks.append(constrain(jnp.swapaxes(k, 1, 2), CACHE_LAYER_AXES))
            vs.append(constrain(jnp.swapaxes(v, 1, 2), CACHE_LAYER_AXES))
            return k, v

        x = decoder_layer(cfg, x, with_adapters(w, lora, i), rope, attend_with(mask, keep))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    if return_hidden:
        return _logits(cfg, w, last), LayerCache(ks, vs), x
    return _logits(cfg, w, last), LayerCache(ks, vs)


PROMPT_LOGPROB_CHUNK = 128  # positions whose [rows, chunk, vocab] logits exist at once


def prompt_logprobs(cfg: ModelConfig, w: ServingWeights, hidden, targets, k: int):
    """Log-probabilities of each prompt's next tokens under the model's raw distribution.

    hidden [B, T, E] (the last layer's output, e.g. from `prefill(..., return_hidden=True)`), targets
    [B, T]: the token position t is scored on (the prompt's token t + 1; `next_tokens`) -> (chosen
    [B, T], top ids [B, T, k], top values [B, T, k], rank [B, T]: 1 + how many tokens are more likely).
    The vocabulary-wide logits are made a chunk of positions at a time (`lax.map`), so a long
    prompt never holds [T, vocab] floats.
    """
    b, t, e = hidden.shape
    chunk = min(t, PROMPT_LOGPROB_CHUNK)
    n = -(-t // chunk)
    pad = n * chunk - t
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))

    def one(args):
        h, y = args  # [B, chunk, E], [B, chunk]
        logits = _logits(cfg, w, h.reshape(b * chunk, e))
        y = y.reshape(-1)
        chosen, ids, values = token_logprobs(logits, y, k)
        rank = 1 + jnp.sum(logits > jnp.take_along_axis(logits, y[:, None], axis=-1), axis=-1, dtype=jnp.int32)
        return (chosen.reshape(b, chunk), ids.reshape(b, chunk, k), values.reshape(b, chunk, k),
                rank.reshape(b, chunk))

    split = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)  # noqa: E731
    out = jax.lax.map(one, (split(hidden), split(targets)))
    join = lambda a: jnp.moveaxis(a, 0, 1).reshape(b, n * chunk, *a.shape[3:])[:, :t]  # noqa: E731
    return tuple(join(a) for a in out)


def next_tokens(tokens):
    """tokens [B, T] -> the token each position predicts [B, T] (the last column is padding)."""
    return jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))


def decode(cfg: ModelConfig, w: ServingWeights, cache: LayerCache, tokens, positions, attend: int, lora=None):
    """One token per slot. tokens, positions [B]; writes K/V at `positions` (dropped when >= the cache
    length, which is how idle slots are ignored) and attends to cache positions [0, attend) that are
    <= the slot's own. `attend` (static) is a bucket >= every active slot's position + 1, so short
    contexts do not pay for the whole cache.

    Returns logits [B, V] and the updated cache (update in place when the caller donates it).
    """
    b = tokens.shape[0]
    rope = rope_tables(cfg, positions[:, None])
    mask = cache_mask(positions[:, None], attend)  # [B, 1, attend]
    rows = jnp.arange(b)
    x = embed_tokens(cfg, w.embed, tokens[:, None])
    new_k, new_v = [], []
    for i in range(len(w.layers)):
        def write(k, v, i=i):  # k, v [B, 1, KV, D]; in place when the cache is donated
            k_all = cache.k[i].at[rows, :, positions].set(k[:, 0].astype(cache.k[i].dtype), mode="drop")
            v_all = cache.v[i].at[rows, :, positions].set(v[:, 0].astype(cache.v[i].dtype), mode="drop")
            new_k.append(constrain(k_all, CACHE_LAYER_AXES))
            new_v.append(constrain(v_all, CACHE_LAYER_AXES))
            # the layer wants [B, S, KV, D]: XLA folds this transpose into the attention matmuls
            return jnp.swapaxes(new_k[-1][:, :, :attend], 1, 2), jnp.swapaxes(new_v[-1][:, :, :attend], 1, 2)

        x = decoder_layer(cfg, x, with_adapters(w, lora, i), rope, attend_with(mask, write))
    return _logits(cfg, w, x[:, 0]), LayerCache(new_k, new_v)

