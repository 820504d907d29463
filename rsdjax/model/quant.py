"""INT8 weights for every projection and the LM head, with Qwix arrays (`qwix.QArray`).

A kernel is stored as int8 with float32 scales (absmax / 127, symmetric) per output channel, or per
group of input channels as well (`DEFAULT_GROUPS`). `qmatmul` is the matmul every projection goes
through when its kernel is a QArray: the activations are quantized on the fly (absmax per row, and
per group where the kernel has groups) and the product is an int8 x int8 -> int32 dot, scaled by
both scales afterwards (the math of Qwix's `einsum` on two QArrays, written out in fewer ops).

Why not weight-only dequantize-then-matmul (Qwix's choice for float activations): it relies on the
compiler fusing the int8 -> float convert into the matmul, which XLA:CPU does not do: its dots are
library calls, so the convert writes a float32 copy of every weight on every step (HLO
`wrapped_convert f32[4096,2048]`, measured 6-13x slower than the float32 weight it replaces). The
int8 dot reads only the int8 weight (AMX/VNNI on x86). Why not `qwix.quantize_model`: it intercepts
the einsums of a Flax module's `__call__`; the serving forward is plain functions over per-layer
arrays (rsdjax/infer/forward.py), so the kernels are swapped here, at the projection.

One measured XLA:CPU detail: a one-row int8 dot takes a slow generic path (the weight converted to
int32 first); two rows take the fast one, so a single row is padded to two.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import qwix
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.parallel.sharding import jit_or_shapes

QArray = qwix.QArray
MODES = ("int8",)
# Serving-layout kernels and the axes their matmul contracts (see rsdjax/infer/forward.STORED_ORDER):
# the model's equations are wq/wk/wv "bte,ehd->bthd", wo "bthd,hde->bte", w_gate/w_up "bte,em->btm",
# w_down "btm,me->bte", stored as [in, out] (wq, wk, wv), [head_dim, heads, embed] (wo) and
# [out, in] (MLP); the LM head is [vocab, embed].
CONTRACTED = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w_gate": (1,), "w_up": (1,), "w_down": (1,)}
HEAD_CONTRACTED = (1,)
# Scales per group of 64 contracted channels, kernel and activations alike, on every kernel whose
# contracted dim 64 divides (wo's last contracted dim is its heads: per channel). SmolLM2-135M
# held-out perplexity vs float32 (tests/test_quant.py, this qmatmul): groups of 64 everywhere +1.11%
# (the 2% target met); w_down alone per 64 +2.67%; per channel everywhere faster (see
# docs/inference.md) but further off. The grouped dot is a batched int8 dot, which XLA:CPU runs far
# slower than a plain one: accuracy was chosen over speed here; `quantize_serving(groups={})` is the
# per-channel variant, and an int8 checkpoint records its groups.
DEFAULT_GROUPS = {name: 64 for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")}


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
    """einsum(equation, x, w) with w int8: x quantized per row (and per group where w has groups),
    one int8 x int8 -> int32 dot, then both scales: float32 out (x's dtype).

    Written here rather than with `qwix.einsum`: the same math in fewer ops (one absmax, one
    round/convert, the dot, one fused rescale), and groups under 128 stay int8 (Qwix dequantizes
    those tiles to float first).
    """
    inputs, out = equation.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    rows = tuple(i for i, c in enumerate(xs) if c not in ws)
    contracted = "".join(c for c in xs if c in ws and c not in out)
    pad = math.prod(x.shape[i] for i in rows) == 1 and rows
    if pad:  # see the module docstring: two rows take XLA:CPU's fast int8 path
        x = jnp.concatenate([x, x], axis=rows[0])
    grouped = [c for c in contracted if w.scale.shape[ws.index(c)] > 1]  # at most one: the last contracted
    wq, wscale = w.qvalue, w.scale
    out_q = out
    if grouped:  # split the grouped axis c into (groups g, c): the groups become a batch dim of the dot
        c, g = grouped[0], next(ch for ch in "GHJKLNOPQRSUVWXYZ" if ch not in equation)
        n = wscale.shape[ws.index(c)]
        x = _split_axis(x, xs.index(c), n)
        wq, wscale = _split_axis(wq, ws.index(c), n), jnp.expand_dims(wscale, ws.index(c) + 1)
        xs, ws, out_q = xs.replace(c, g + c), ws.replace(c, g + c), g + out
    absmax = jnp.max(jnp.abs(x), axis=tuple(i for i, ch in enumerate(xs) if ch in contracted), keepdims=True)
    xscale = jnp.where(absmax > 0, absmax / 127, 1.0).astype(jnp.float32)
    xq = jnp.round(x / xscale).astype(jnp.int8)
    acc = jnp.einsum(f"{xs},{ws}->{out_q}", xq, wq, preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * _along(xs, xscale, out_q, contracted) * _along(ws, wscale, out_q, contracted)
    if out_q != out:  # the per-group partial sums
        y = jnp.sum(y, axis=0)
    if pad:
        y = jax.lax.slice_in_dim(y, 0, 1, axis=0)  # the rows' first axis leads the output too
    return y.astype(x.dtype)


def _along(letters: str, a, target: str, dropped: str):
    """`a` (dims `letters`, size 1 on those in `dropped`) broadcastable against dims `target`."""
    a = jnp.squeeze(a, tuple(i for i, ch in enumerate(letters) if ch in dropped))
    kept = [ch for ch in letters if ch not in dropped]
    a = jnp.transpose(a, sorted(range(len(kept)), key=lambda i: target.index(kept[i])))
    present = sorted(kept, key=target.index)
    return a.reshape([a.shape[present.index(ch)] if ch in present else 1 for ch in target])


def _split_axis(a, axis: int, groups: int):
    return a.reshape(a.shape[:axis] + (groups, a.shape[axis] // groups) + a.shape[axis + 1:])


def _scale_sharding(value_sharding, contracted: tuple[int, ...], ndim: int):
    if not isinstance(value_sharding, NamedSharding):
        return value_sharding
    spec = tuple(value_sharding.spec) + (None,) * (ndim - len(value_sharding.spec))
    spec = tuple(None if i in contracted else s for i, s in enumerate(spec))
    return NamedSharding(value_sharding.mesh, PartitionSpec(*spec))


def head_matmul(x, head: QArray):
    """x [..., E] . head [vocab, embed] -> float32 logits [..., V] (the LM head's einsum, int8)."""
    lead = "abcdfg"[:x.ndim - 1]
    return qmatmul(f"{lead}e,ve->{lead}v", x, head).astype(jnp.float32)


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

    def one(w, contracted, name):
        group = groups.get(name)
        group = group if group and w.shape[contracted[-1]] % group == 0 else None
        quantize = lambda a: quantize_kernel(a, contracted, group)  # noqa: E731
        sharding = getattr(w, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return jax.jit(quantize)(w)
        shapes = jax.eval_shape(quantize, w)
        out = dataclasses.replace(shapes, qvalue=sharding, scale=_scale_sharding(sharding, contracted, w.ndim))
        return jit_or_shapes(quantize, out, w)  # shape-only weights (an int8 checkpoint's target) too

    layers = []
    for p in weights.layers:
        p = dict(p)
        for name, contracted in CONTRACTED.items():
            p[name] = one(p[name], contracted, name)
        layers.append(p)
    head = weights.lm_head if weights.lm_head is not None else weights.embed
    return dataclasses.replace(weights, layers=layers, lm_head=one(head, HEAD_CONTRACTED, "lm_head"))


def is_quantized(w) -> bool:
    return isinstance(w, QArray)
