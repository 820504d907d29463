"""INT8 weight-only quantization of every projection and the LM head, with Qwix arrays (`qwix.QArray`).

A kernel is stored as int8 with float32 scales (absmax / 127, symmetric) per output channel (or per
group of input channels as well, `groups`; none by default). `qmatmul` is the matmul every
projection goes through when its kernel is a QArray: x @ (int8 values * scales), activations in
float. Decoding at batch 1 (one row) is the case this serves: written as [1, K] @ [N, K].T, XLA:CPU
fuses the int8 -> float convert and the scale into its matrix-vector dot (a loop that reads the
int8 weight once, no float copy; tests/test_quant.py checks the HLO). Any other form of the same
product (rank-2 result, scale applied after a transpose, per-group scales through a reshape) and
every dot with more rows is a library call: the dequantized kernel is then a float32 temporary,
one weight at a time (prefill and batched decode pay for it; the weights stay int8 in memory).

Why not int8 x int8 -> int32 dots on quantized activations (Qwix's fast path on two QArrays, what
this module did first): this machine's x86 has AVX2 but no VNNI, and in the decode step they ran
slower than float32 (bench_infer 125M, batch 1: 0.5x f32), and quantizing activations per row cost
SmolLM2-135M +3.75% held-out perplexity (weight-only: -0.6%). Why not `qwix.quantize_model`: it
intercepts the einsums of a Flax module's `__call__`; the serving forward is plain functions over
per-layer arrays (rsdjax/infer/forward.py), so the kernels are swapped here, at the projection.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import qwix
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.parallel.sharding import jit_or_shapes, one_shot_jit

QArray = qwix.QArray
MODES = ("int8",)
INT8 = "int8"  # the layout name of quantized serving weights (rsdjax.infer.forward.ServingWeights.layout)
# Kernels and the axes their matmul contracts, in the model's layout: wq/wk/wv "bte,ehd->bthd", wo
# "bthd,hde->bte", w_gate/w_up "bte,em->btm", w_down "btm,me->bte"; the LM head is [vocab, embed].
CONTRACTED = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w_gate": (0,), "w_up": (0,), "w_down": (0,)}
HEAD_CONTRACTED = (1,)
# The int8 layout, a permutation of the model's, whatever float layout the serving weights had
# (rsdjax/infer/forward.LAYOUTS): the contracted axes minor, in the order of the model's equation.
# XLA:CPU's fused matrix-vector dot reads the weight row by row, and with the contracted axis major
# or permuted it ran 2-4x slower than float32.
INT8_ORDER = {"wq": (1, 2, 0), "wk": (1, 2, 0), "wv": (1, 2, 0),  # [embed, heads, head_dim] -> [heads, head_dim, embed]
              "wo": (2, 0, 1),  # [heads, head_dim, embed] -> [embed, heads, head_dim]
              "w_gate": (1, 0), "w_up": (1, 0), "w_down": (1, 0)}  # [in, out] -> [out, in]

# Per-channel everywhere: weight-only int8 is within 1% of float32 on SmolLM2-135M, and per-group
# scales (a reshape in the dequantize) keep XLA:CPU from fusing it into the matrix-vector dot
# (w_down per 128: 25x slower than per channel).
DEFAULT_GROUPS = {}


class QuantizeError(ValueError):
    pass


def make_qarray(qvalue, scale) -> QArray:
    """A symmetric int8 QArray from its two arrays (as an int8 checkpoint stores them)."""
    return QArray(qvalue=qvalue, scale=scale, zero_point=None, qtype=jnp.int8)


def check_mode(mode: str | None) -> str | None:
    if mode in (None, "none"):
        return None
    if mode not in MODES:
        raise QuantizeError(f"--quantize: '{mode}' is not supported (choose from {', '.join(MODES)})")
    return mode


def quantize_kernel(w, contracted: tuple[int, ...], group: int | None = None) -> QArray:
    """int8 values in w's layout; scales per output channel (and per `group` inputs when given)."""
    channels = tuple(i for i in range(w.ndim) if i not in contracted)
    tiles = None
    if group:
        axis = contracted[-1]
        if w.shape[axis] % group:
            raise QuantizeError(f"quantization group {group} does not divide the contracted dim {w.shape[axis]}")
        tiles = {axis: group}
    return qwix.quantize(w, jnp.int8, channelwise_axes=channels, tiled_axes=tiles or None)


def transpose(w, order):
    """jnp.transpose for float arrays and QArrays alike (the scale has the value's rank)."""
    if isinstance(w, QArray):
        return jax.tree.map(lambda a: jnp.transpose(a, order), w)
    return jnp.transpose(w, order)


def qmatmul(equation: str, x, w: QArray):
    """einsum(equation, x, w) with w int8, weight-only: x @ (int8 values * scales), float32 out (x's
    dtype), written as [R, K] @ [N, K].T over the int8 layout (`_rows_matmul`)."""
    inputs, out = equation.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    contracted = "".join(c for c in xs if c in ws)
    if not set(contracted) & set(out):
        return _rows_matmul(x, xs, w, ws, out, contracted)
    return jnp.einsum(equation, x, dequantize(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def dequantize(w: QArray, dtype):
    """w's float values (`qwix.dequantize`'s product, with per-group scales as a reshape). XLA:CPU
    fuses it into the one-row dot only for per-channel scales (see `DEFAULT_GROUPS`)."""
    split_value, split_scale = [], []
    for n, g in zip(w.qvalue.shape, w.scale.shape):
        split_value += [n] if g in (1, n) else [g, n // g]
        split_scale += [g] if g in (1, n) else [g, 1]
    value = w.qvalue.astype(dtype).reshape(split_value) * w.scale.astype(dtype).reshape(split_scale)
    return value.reshape(w.qvalue.shape)


def _rows_matmul(x, xs: str, w: QArray, ws: str, out: str, contracted: str):
    """The rows of x times the dequantized w, as [R, K] @ [N, K].T with w's out axes first and its
    contracted axes minor: that is the int8 layout (`INT8_ORDER`), so the transposes here cancel the
    model-layout view's and the weight is read in its stored order.

    One row (decode at batch 1): XLA:CPU fuses the int8 -> float convert and the scale into its
    matrix-vector dot, a loop that reads the int8 weight once with no float copy (tests/test_quant.py
    checks the HLO); any other form of the same product makes a float32 copy of the weight first.
    More rows (prefill, batched decode): the dot is a library call, so the dequantized weight is a
    float32 temporary, one weight at a time (`_after`)."""
    outs = "".join(c for c in ws if c not in xs)
    rows = [c for c in xs if c not in contracted]
    k = math.prod(x.shape[xs.index(c)] for c in contracted)
    n_shape = [w.shape[ws.index(c)] for c in outs]
    row_shape = [x.shape[xs.index(c)] for c in rows]
    values = dequantize(w, x.dtype)
    if math.prod(row_shape) > 1:
        values = values * _after(x)
    matrix = jnp.transpose(values, [ws.index(c) for c in outs + contracted])
    lhs = jnp.transpose(x, [xs.index(c) for c in rows + list(contracted)])
    y = jnp.matmul(lhs.reshape(math.prod(row_shape), k), matrix.reshape(math.prod(n_shape), k).T,
                   preferred_element_type=jnp.float32).reshape(row_shape + n_shape)
    have = rows + list(outs)
    return jnp.transpose(y, [have.index(c) for c in out]).astype(x.dtype)


def _after(x):
    """1.0, computed from x: multiplying a dequantized weight by it makes the float32 temporary wait for
    its layer's input. Otherwise XLA:CPU, seeing temporaries that depend only on parameters, made every
    layer's first, all live at once (226 MB for 36 kernels of 2048 x 768) in fresh pages each step:
    55,000 page faults, 77 ms against 11 ms made one at a time (a [16, 768] chain of 36, measured)."""
    first = x.reshape(-1)[0]
    return 1 + 0 * jnp.where(jnp.isfinite(first), first, 0).astype(x.dtype)


def _scale_sharding(value_sharding, contracted: tuple[int, ...], ndim: int):
    if not isinstance(value_sharding, NamedSharding):
        return value_sharding
    spec = tuple(value_sharding.spec) + (None,) * (ndim - len(value_sharding.spec))
    spec = tuple(None if i in contracted else s for i, s in enumerate(spec))
    return NamedSharding(value_sharding.mesh, PartitionSpec(*spec))


def _permuted(sharding: NamedSharding, order: tuple[int, ...], ndim: int) -> NamedSharding:
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*(spec[i] for i in order)))


def head_matmul(x, head: QArray):
    """x [..., E] . head [vocab, embed] -> float32 logits [..., V] (the LM head's einsum, int8)."""
    lead = "abcdfg"[:x.ndim - 1]
    return qmatmul(f"{lead}e,ve->{lead}v", x, head).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _quantizer(contracted: tuple[int, ...], group: int | None, order: tuple[int, ...]):
    """One function per kind of kernel, so its compiled program serves every layer (a fresh function
    per kernel compiled 211 times for SmolLM2's 30 layers: 29 s)."""
    return lambda a: transpose(quantize_kernel(a, contracted, group), order)


def quantize_serving(weights, mode: str = "int8", groups: dict[str, int] | None = None):
    """`rsdjax.infer.forward.ServingWeights` with every projection and the LM head as int8 QArrays.

    `groups`: kernel name -> group size of its per-group scales (default `DEFAULT_GROUPS`; a size
    that does not divide the kernel's input falls back to per-channel); every other kernel, and the
    LM head ("lm_head"), per output channel. Each int8 value array keeps its float kernel's sharding
    exactly; its scales are sharded the same on the output dims (replicated on the contracted ones).
    The embedding gather stays float; a tied LM head gets its own int8 copy of the embedding.
    """
    check_mode(mode)
    if isinstance(weights.layers, dict):  # the pipelined layout (stage > 1) keeps the layers stacked
        raise QuantizeError(f"--quantize {mode} is not served on a mesh with stage > 1 yet; use stage=1")

    groups = DEFAULT_GROUPS if groups is None else groups

    def one(w, contracted, name, stored=None):
        """`stored`: the permutation that gave `w`'s layout from the model's (None: the model's)."""
        stored = stored or tuple(range(w.ndim))
        contracted = tuple(sorted(stored.index(a) for a in contracted))
        order = tuple(stored.index(a) for a in INT8_ORDER.get(name, range(w.ndim)))
        group = groups.get(name)
        group = group if group and w.shape[contracted[-1]] % group == 0 else None
        quantize = _quantizer(contracted, group, order)
        sharding = getattr(w, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return one_shot_jit(quantize)(w)
        shapes = jax.eval_shape(quantize, w)
        value, scale = (_permuted(s, order, w.ndim) for s in (sharding, _scale_sharding(sharding, contracted, w.ndim)))
        out = dataclasses.replace(shapes, qvalue=value, scale=scale)
        return jit_or_shapes(quantize, out, w)  # shape-only weights (an int8 checkpoint's target) too

    layers = []
    for p in weights.layers:
        p = dict(p)
        for name, contracted in CONTRACTED.items():
            p[name] = one(p[name], contracted, name, weights.stored_order(name))
        layers.append(p)
    head = weights.lm_head if weights.lm_head is not None else weights.embed
    return dataclasses.replace(weights, layers=layers, lm_head=one(head, HEAD_CONTRACTED, "lm_head"), layout=INT8)


def is_quantized(w) -> bool:
    return isinstance(w, QArray)
