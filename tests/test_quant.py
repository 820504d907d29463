"""INT8 weights (rsdjax/model/quant.py): close to float32, int8 in memory, sharded like the floats.

The reference for "close" is the float32 forward of the same weights; for quality, the real
SmolLM2-135M's perplexity on held-out text of the bundled corpus (within 2% of float32).
"""
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from rsdjax.infer import forward
from rsdjax.infer.engine import SlotEngine
from rsdjax.infer.warmup import lower_decode
from rsdjax.loading import load_model
from rsdjax.model.attention import attend_with, causal_mask
from rsdjax.model.llama import decoder_layer, embed_tokens, lm_logits, rope_tables
from rsdjax.model.quant import CONTRACTED, QArray, quantize_serving
from rsdjax.parallel.mesh import make_mesh
from rsdjax.tokenizer import Tokenizer

from conftest import ROOT


def all_logits(cfg, w, tokens):
    """The serving weights' forward at every position, one jitted layer at a time (one compile)."""
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    rope = rope_tables(cfg, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    mask = causal_mask(b, t)
    layer = jax.jit(lambda x, p: decoder_layer(cfg, x, forward.layer_view(p, w.layout), rope, attend_with(mask)))
    x = embed_tokens(cfg, w.embed, tokens)
    for p in w.layers:
        x = layer(x, p)
    head = w.embed if w.lm_head is None else w.lm_head
    return jax.jit(lambda x, n, h: lm_logits(cfg, x, n, h))(x, w.final_norm, head)


TOKENS = np.random.default_rng(0).integers(3, 512, size=(2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def tiny_weights(tiny_hf_dir):
    model = load_model(tiny_hf_dir)
    weights = forward.serving_weights(model, make_mesh({}))
    return model.cfg, weights, quantize_serving(weights)


def test_int8_arrays_are_the_same_from_either_float_layout(tiny_hf_dir, tiny_weights):
    """The int8 layout is fixed (INT8_ORDER): quantizing the one-row ("matvec") serving layout gives
    the very arrays quantizing the batched ("matmul") one does, so an int8 checkpoint serves either engine."""
    _, _, int8 = tiny_weights
    other = quantize_serving(forward.serving_weights(load_model(tiny_hf_dir), make_mesh({}), "matvec"))
    for a, b in zip(jax.tree.leaves(int8), jax.tree.leaves(other), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_int8_logits_are_close_to_float32(tiny_weights):
    cfg, f32, int8 = tiny_weights
    ref = np.asarray(all_logits(cfg, f32, TOKENS))
    got = np.asarray(all_logits(cfg, int8, TOKENS))
    diff = np.abs(got - ref)
    spread = ref.std()
    print(f"int8 vs f32 logits: max abs diff {diff.max():.4g}, mean {diff.mean():.4g} (logit std {spread:.4g})")
    assert diff.mean() < 0.02 * spread and diff.max() < 0.2 * spread
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    # one row (decode at batch 1) takes the fused matrix-vector path: the same numbers
    np.testing.assert_allclose(np.asarray(all_logits(cfg, int8, TOKENS[:1, :1])), got[:1, :1], atol=1e-5, rtol=1e-5)


def test_int8_weights_stay_int8_in_the_compiled_decode_step(tiny_weights, tiny_hf_dir):
    """No instruction of the optimized HLO makes a float (or int32) array the size of an int8 kernel:
    each weight is read as int8 by the dot itself."""
    cfg, _, int8 = tiny_weights
    kernels = [p[name] for p in int8.layers for name in CONTRACTED] + [int8.lm_head]
    assert all(isinstance(k, QArray) and k.qvalue.dtype == jnp.int8 for k in kernels)
    sizes = {math.prod(k.shape) for k in kernels}
    engine = SlotEngine(load_model(tiny_hf_dir), max_slots=1, max_context=64)
    engine.weights = int8
    hlo = lower_decode(engine, 64).compile().as_text()
    offenders, fused = [], False
    for line in hlo.splitlines():  # the buffers of the program: what fused computations compute is never stored
        if re.match(r"(ENTRY )?%\S+ ", line):
            fused = bool(re.match(r"%(fused|wrapped)", line))
        m = None if fused else re.match(r"\s*(ROOT )?%\S+ = (f32|s32|bf16|f16)\[([\d,]*)\]", line)
        if m and "parameter(" not in line and m.group(3):
            if math.prod(int(d) for d in m.group(3).split(",")) in sizes:
                offenders.append(line.strip()[:160])
    assert not offenders, offenders
    # every int8 kernel is converted inside a fusion whose root is the matrix-vector dot
    fused_dots = re.findall(r"\n%fused[^\n]*\(([^)]*)\)[^{]*\{((?:\n  [^\n]*)*?\n  ROOT %\S+ = f32\[\d+\][^\n]* dot\()", hlo)
    assert sum(("s8[" in params) for params, _ in fused_dots) == len(kernels), (len(fused_dots), len(kernels))


def test_int8_on_tensor_2_data_2_equals_one_device(tiny_hf_dir, tiny_weights):
    cfg, _, one = tiny_weights
    mesh = make_mesh({"data": 2, "tensor": 2})
    model = load_model(tiny_hf_dir, mesh=mesh)
    float_w = forward.serving_weights(model, mesh)
    sharded = quantize_serving(float_w)
    for name in CONTRACTED:  # the int8 values are sharded exactly like the float kernels (same dims)
        q = forward.layer_view(sharded.layers[0], sharded.layout)[name].qvalue
        f = forward.layer_view(float_w.layers[0], float_w.layout)[name]
        assert isinstance(q.sharding, NamedSharding) and q.sharding.is_equivalent_to(f.sharding, f.ndim)
    assert any(s is not None for s in sharded.layers[0]["w_up"].qvalue.sharding.spec)  # really sharded
    got = np.asarray(all_logits(cfg, sharded, TOKENS))
    ref = np.asarray(all_logits(cfg, one, TOKENS))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    one_row = TOKENS[:1, :1]  # the fused matrix-vector path of decoding at batch 1
    np.testing.assert_allclose(np.asarray(all_logits(cfg, sharded, one_row)),
                               np.asarray(all_logits(cfg, one, one_row)), atol=1e-4, rtol=1e-4)


def held_out_tokens(tokenizer, n: int = 384) -> np.ndarray:
    """The last document of each language in the bundled corpus (the held-out ones of `rsdjax eval`)."""
    rows = []
    for lang in ("en", "ja"):
        text = sorted((ROOT / "data" / "corpus" / lang).glob("*.txt"))[-1].read_text(encoding="utf-8")
        ids = tokenizer.encode(text, add_bos=False)
        assert len(ids) >= n, f"{lang}: only {len(ids)} tokens"
        rows.append(ids[:n])
    return np.asarray(rows, np.int32)


def perplexity(logits, tokens) -> float:
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1], jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), axis=-1)
    return float(jnp.exp(nll.mean()))


# The target: within 2% of float32 (weight-only int8, per output channel; docs/inference.md).
@pytest.mark.slow
def test_int8_perplexity_of_the_real_model_within_2_percent(smollm2_hf_dir):
    model = load_model(smollm2_hf_dir)
    tokens = held_out_tokens(Tokenizer.load(smollm2_hf_dir))
    f32 = forward.serving_weights(model, make_mesh({}))
    ref, got = all_logits(model.cfg, f32, tokens), all_logits(model.cfg, quantize_serving(f32), tokens)
    ppl_f32, ppl_int8 = perplexity(ref, tokens), perplexity(got, tokens)
    diff = np.abs(np.asarray(got) - np.asarray(ref))
    print(f"SmolLM2-135M held-out perplexity: f32 {ppl_f32:.4f}, int8 {ppl_int8:.4f} "
          f"({100 * (ppl_int8 / ppl_f32 - 1):+.2f}%); logits max abs diff {diff.max():.4g}, mean {diff.mean():.4g} "
          f"(logit std {np.asarray(ref).std():.4g})")
    assert ppl_f32 < 100  # the float model itself reads the text sensibly
    assert abs(ppl_int8 / ppl_f32 - 1) < 0.02


def test_lora_applies_on_top_of_int8(tiny_hf_dir, tmp_path):
    """A PEFT adapter on the int8 base: logits near peft + transformers on the float base, and the
    adapter's effect far above the int8 error (so the comparison means something)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from rsdjax.checkpoint.peft import apply_adapter

    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_hf_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # B starts at zero: give it values, as training would
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        peft_model.save_pretrained(tmp_path / "adapter")
        expected = peft_model.eval()(torch.tensor(TOKENS)).logits.numpy()
        plain = LlamaForCausalLM.from_pretrained(tiny_hf_dir).eval()(torch.tensor(TOKENS)).logits.numpy()
    model = apply_adapter(load_model(tiny_hf_dir), tmp_path / "adapter")
    int8 = quantize_serving(forward.serving_weights(model, make_mesh({})))
    assert "lora" in int8.layers[0] and isinstance(int8.layers[0]["wq"], QArray)
    got = np.asarray(all_logits(model.cfg, int8, TOKENS))
    error, effect = np.abs(got - expected).mean(), np.abs(expected - plain).mean()
    print(f"int8 + LoRA vs peft: mean abs diff {error:.4g}; the adapter's own effect {effect:.4g}")
    assert error < 0.1 * effect


@pytest.fixture(scope="module")
def int8_checkpoint(tiny_hf_dir, tmp_path_factory):
    from rsdjax.cli import main

    out = tmp_path_factory.mktemp("int8") / "ckpt"
    assert main(["convert", "hf-to-rsdjax", "--model", str(tiny_hf_dir), "-o", str(out), "--quantize", "int8"]) == 0
    return out


def test_stored_int8_checkpoint_loads_as_quantizing_at_load(int8_checkpoint, tiny_hf_dir):
    """`convert --quantize int8` then a plain load: the very arrays (and so the logits) of `--quantize int8`."""
    from rsdjax.infer.engine import load_engine

    stored, _ = load_engine(int8_checkpoint, kind="slots", max_slots=1, max_context=64)
    at_load, _ = load_engine(tiny_hf_dir, kind="slots", quantize="int8", max_slots=1, max_context=64)
    assert isinstance(stored.weights.layers[0]["w_down"], QArray) and isinstance(stored.weights.lm_head, QArray)
    assert stored.weights.layers[0]["w_down"].qvalue.dtype == jnp.int8
    assert jax.tree.structure(stored.weights) == jax.tree.structure(at_load.weights)
    for a, b in zip(jax.tree.leaves(stored.weights), jax.tree.leaves(at_load.weights)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(all_logits(stored.cfg, stored.weights, TOKENS)),
                                  np.asarray(all_logits(at_load.cfg, at_load.weights, TOKENS)))
    int8_bytes = sum(a.nbytes for a in jax.tree.leaves(stored.weights.layers))
    float_bytes = sum(a.nbytes for a in jax.tree.leaves(forward.serving_weights(load_model(tiny_hf_dir),
                                                                                   make_mesh({})).layers))
    assert int8_bytes < 0.3 * float_bytes  # int8 kernels (+ small scales and float norms) on disk and in memory
    from rsdjax.cli import main

    assert main(["generate", "--model", str(int8_checkpoint), "--prompt-ids", "1,2,3", "--max-tokens", "4"]) == 0


def test_eval_reads_the_int8_checkpoint_as_eval_quantize_does(int8_checkpoint, tiny_hf_dir, tiny_tokenizer_dir,
                                                              capsys):
    from rsdjax.cli import main

    text = str(ROOT / "data" / "corpus" / "en")
    common = ["--tokenizer", str(tiny_tokenizer_dir), f"en={text}", "--seq-len", "64", "--json"]
    runs = {}
    for name, extra in (("stored", ["--model", str(int8_checkpoint)]),
                        ("at_load", ["--model", str(tiny_hf_dir), "--quantize", "int8"]),
                        ("f32", ["--model", str(tiny_hf_dir)])):
        assert main(["eval", *extra, *common]) == 0
        runs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loss = {k: r["sources"]["en"]["loss"] for k, r in runs.items()}
    assert runs["stored"]["quantize"] == runs["at_load"]["quantize"] == "int8" and runs["f32"]["quantize"] is None
    assert loss["stored"] == loss["at_load"]
    assert loss["stored"] != loss["f32"] and abs(loss["stored"] - loss["f32"]) < 0.01 * loss["f32"]


def test_bad_quantize_input_is_one_line(int8_checkpoint, tiny_hf_dir, tmp_path, capsys):
    from rsdjax.checkpoint.errors import CheckpointError
    from rsdjax.cli import main

    cases = [
        (["convert", "hf-to-rsdjax", "--model", str(int8_checkpoint), "-o", str(tmp_path / "a"), "--quantize", "int8"],
         "already quantized"),
        (["convert", "hf-to-rsdjax", "--model", str(tiny_hf_dir), "-o", str(tmp_path / "b"), "--quantize", "int4"],
         "'int4' is not supported"),
        (["convert", "rsdjax-to-hf", "--model", str(int8_checkpoint), "-o", str(tmp_path / "c")], "already quantized"),
        (["generate", "--model", str(int8_checkpoint), "--quantize", "int8", "--prompt-ids", "1,2,3"], "drop --quantize"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, (argv, err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(CheckpointError, match="holds no float weights"):
        load_model(int8_checkpoint)
