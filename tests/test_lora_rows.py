"""`lora_rows_delta` (batched multi-LoRA) against the per-row formula in numpy, row by row: both of its
forms (every adapter's product with a pick, and the per-row gather), base rows, and every projection
shape of the layer (wq's heads out, wo's heads in)."""
import jax.numpy as jnp
import numpy as np
import pytest

from rsdjax.model.lora_rows import lora_rows_delta

N, R = 3, 4  # adapters in the pool, rank
SHAPES = {  # equation -> (input dims, output dims), as `decoder_layer` calls them
    "bte,ehd->bthd": ((8,), (2, 3)),
    "bthd,hde->bte": ((2, 3), (8,)),
    "btm,me->bte": ((10,), (8,)),
}


@pytest.mark.parametrize("equation", SHAPES)
@pytest.mark.parametrize("index", [[0, 2, 1, 3, 3, 0], [2, 0]], ids=["pick", "gather"])  # rows >= N, < N
def test_each_row_gets_its_own_adapter(equation, index):
    ins, outs = SHAPES[equation]
    rng = np.random.default_rng(0)
    t = 2
    x = rng.normal(size=(len(index), t, *ins)).astype(np.float32)
    a = rng.normal(size=(*ins, N, R)).astype(np.float32)  # the pool layout (rsdjax.infer.adapters)
    b = rng.normal(size=(N, R, *outs)).astype(np.float32)
    rows = {"wx": {"a": jnp.asarray(a), "b": jnp.asarray(b)}, "index": jnp.asarray(index, jnp.int32)}
    got = np.asarray(lora_rows_delta(jnp.asarray(x), rows, "wx", equation))
    d_in, d_out = int(np.prod(ins)), int(np.prod(outs))
    for row, entry in enumerate(index):
        flat = x[row].reshape(t, d_in)
        if entry == 0:  # the base: nothing added
            want = np.zeros((t, d_out), np.float32)
        else:
            want = flat @ a.reshape(d_in, N, R)[:, entry - 1] @ b[entry - 1].reshape(R, d_out)
        np.testing.assert_allclose(got[row].reshape(t, d_out), want, rtol=1e-5, atol=1e-5)
