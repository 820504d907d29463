"""`project(equation, x, w)`: einsum x . W with a hand-written VJP for the weight gradient.

Same forward and the same math as `jnp.einsum`. Why it exists: the weight gradient contracts over
batch x sequence, and XLA:CPU (YNNPACK dots) wants that dimension minor in one operand; left to
itself it transposes the *activation gradient* inside the elementwise fusion that produces it, a
strided loop that took ~25% of a train step of a 512-wide Llama (scripts/bench_train.py profile).
Here the smaller of (input, output gradient) is transposed explicitly, as its own op, and the
weight gradient is one plain row-major matmul. On accelerators this changes nothing measurable.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rsdjax.model.quant import QArray, qmatmul


def project(equation: str, x, w):
    if isinstance(w, QArray):  # an int8 kernel (rsdjax/model/quant.py): inference only
        return qmatmul(equation, x, w)
    return _projection(equation)(x, w)


@functools.lru_cache(maxsize=None)
def _projection(equation: str):
    inputs, out = equation.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    contracted = "".join(c for c in xs if c in ws and c not in out)
    rows = "".join(c for c in xs if c not in contracted)  # batch dims of x (and of the output)
    cols = "".join(c for c in ws if c not in contracted)  # the weight's output dims
    if set(rows + cols) != set(out) or any(c in ws for c in rows):
        return functools.partial(jnp.einsum, equation)  # not a plain projection: leave it to XLA

    @jax.custom_vjp
    def f(x, w):
        return jnp.einsum(equation, x, w)

    def fwd(x, w):
        return f(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        dx = jnp.einsum(f"{out},{ws}->{xs}", g, w)
        k = math.prod(x.shape[xs.index(c)] for c in contracted)
        x2 = jnp.einsum(f"{xs}->{rows}{contracted}", x).reshape(-1, k)  # [N, K]
        g2 = jnp.einsum(f"{out}->{rows}{cols}", g).reshape(x2.shape[0], -1)  # [N, M]
        if k <= g2.shape[1]:  # transpose the smaller operand explicitly; the barrier keeps it a separate op
            dw = jax.lax.optimization_barrier(x2.T) @ g2  # [K, M]
        else:
            dw = (jax.lax.optimization_barrier(g2.T) @ x2).T
        shape = [x.shape[xs.index(c)] for c in contracted] + [w.shape[ws.index(c)] for c in cols]
        dw = jnp.einsum(f"{contracted}{cols}->{ws}", dw.reshape(shape))
        return _like(dx.astype(x.dtype), x), _like(dw.astype(w.dtype), w)

    f.defvjp(fwd, bwd)
    return f


def _like(grad, primal):
    """Give a cotangent the manual-axis type of its primal inside `shard_map` (pipeline, explicit TP).

    Autodiff does this itself for built-in ops; a custom VJP must do it by hand: a gradient that
    varies over an axis its primal is invariant over is a partial sum (psum it), and one that is
    invariant where the primal varies is cast to varying.
    """
    have, want = _varying(grad), _varying(primal)
    if have - want:
        grad = jax.lax.psum(grad, tuple(sorted(have - want)))
    if want - have:
        grad = jax.lax.pcast(grad, tuple(sorted(want - have)), to="varying")
    return grad


def _varying(x) -> set[str]:
    """Mesh axes over which `x` varies inside shard_map (jax 0.10: `aval.manual_axis_type.varying`)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()) or ())
