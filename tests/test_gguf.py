"""rsdjax's GGUF reader on GGUFs written here with llama.cpp's own `gguf` writer, checked against
transformers reading the same files; dequantization checked against transformers' independent
dequantizer. Broken GGUF files are cases of the bad-input catalog (test_bad_inputs.py)."""

import numpy as np
import pytest

from conftest import TINY_HF, make_hf_llama, max_abs

# the tensor types llama.cpp's quantizer leaves in Llama GGUFs, spread over one model
TYPES = {"token_embd": "F16", "attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "Q8_0",
         "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q8_0", "output": "F16"}
HF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# f16 scale fields per block (byte offsets) of each type, for random but finite test blocks
HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}


def write_gguf(path, hf_model, arch="llama", types=TYPES, extra_tensor=None):
    """`hf_model` as llama.cpp's converter writes it: GGUF names, Q/K rows permuted, quantized.
    `extra_tensor`: (GGUF name, raw bytes, type) written in place of that tensor."""
    import gguf

    from rsdjax.checkpoint.gguf import permute

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for name, t in hf_model.state_dict().items():
        t = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, i, *rest = name.split(".")
            g = f"blk.{i}.{HF_NAMES['.'.join(rest[:-1])]}.weight"
            if rest[1] == "q_proj":
                t = permute(t, cfg.num_attention_heads)
            elif rest[1] == "k_proj":
                t = permute(t, cfg.num_key_value_heads)
        if extra_tensor is not None and g == extra_tensor[0]:  # this one replaced by raw bytes of another type
            w.add_tensor(g, extra_tensor[1], raw_dtype=extra_tensor[2])
            continue
        qtype = gguf.GGMLQuantizationType[types.get(g.split(".")[-2] if g.startswith("blk") else g.split(".")[0], "F32")]
        data = gguf.quants.quantize(t, qtype) if qtype != gguf.GGMLQuantizationType.F32 else t
        w.add_tensor(g, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gguf")
    model = make_hf_llama(d / "hf", seed=5)
    return write_gguf(d / "tiny.gguf", model)


def test_gguf_logits_match_transformers_on_a_mesh(tiny_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    from rsdjax.loading import load_model
    from rsdjax.parallel.mesh import make_mesh

    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32).eval()
    model = load_model(tiny_gguf, mesh=make_mesh({"data": 2, "tensor": 4}))
    assert model.cfg.num_kv_heads == TINY_HF["num_key_value_heads"] and not model.cfg.tie_word_embeddings
    tokens = np.random.default_rng(1).integers(0, TINY_HF["vocab_size"], (2, 16)).astype(np.int32)
    with torch.no_grad():
        want = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert max_abs(model(tokens), want) <= 1e-4


@pytest.mark.parametrize("kind", sorted(HALF_FIELDS) + ["BF16", "F16"])
def test_dequantize_matches_transformers(kind):
    import gguf
    import torch
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    from rsdjax.checkpoint.gguf import SUPPORTED_TYPES

    assert kind in SUPPORTED_TYPES
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(len(kind))
    raw = rng.integers(0, 256, (8, size), dtype=np.uint8)
    for off in HALF_FIELDS.get(kind, ()):
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, (8, 1)).astype(np.float16).view(np.uint8)
    if kind in ("BF16", "F16"):  # plain floats: finite values of that type
        vals = rng.standard_normal(8 * block).astype(np.float32)
        raw = gguf.quants.quantize(vals, qtype).view(np.uint8).reshape(8, size)
        want = vals.astype(np.float16).astype(np.float32) if kind == "F16" else \
            torch.tensor(vals).to(torch.bfloat16).float().numpy()
    else:
        want = hf_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).numpy()
    got = gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1)
    np.testing.assert_array_equal(got, want)
    from rsdjax.checkpoint import gguf_device

    if kind in gguf_device.TYPES:  # the same blocks dequantized on the device, as the file reader gives them
        data = raw.view(np.float16) if kind == "F16" else raw
        np.testing.assert_array_equal(np.asarray(gguf_device.dequantize(data, kind)).reshape(-1), want)


def _same_as_gguf_reader(path):
    """rsdjax's container reader gives what `gguf.GGUFReader` gives: every metadata value, every tensor's
    name, type, dims and bytes."""
    import gguf

    from rsdjax.checkpoint.gguf_format import read_gguf

    meta, tensors = read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert meta == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.tensor_type, t.shape) for t in tensors] == \
        [(t.name, t.tensor_type, tuple(t.shape.tolist())) for t in ref.tensors]
    for ours, theirs in zip(tensors, ref.tensors):
        assert ours.data.dtype == theirs.data.dtype and np.array_equal(ours.data, theirs.data), ours.name


def test_container_reader_equals_gguf_reader(tiny_gguf, smollm2_gguf):
    _same_as_gguf_reader(tiny_gguf)  # every tensor type the quantizer leaves in Llama GGUFs
    _same_as_gguf_reader(smollm2_gguf)  # a real file: tokenizer arrays, merges, chat template


def test_device_load_equals_the_host_load_and_k_quants_take_the_host_path(tiny_gguf, tmp_path, monkeypatch):
    """The device dequantizer (gguf_device) lays out every parameter bit for bit as the host path does;
    a GGUF with a type it lacks (Q5_1) loads through the host path, still equal to transformers."""
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from rsdjax.checkpoint import gguf_device
    from rsdjax.loading import load_model
    from rsdjax.parallel.mesh import make_mesh

    mesh = make_mesh({"tensor": 2})
    device = nnx.to_pure_dict(nnx.state(load_model(tiny_gguf, mesh=mesh)))
    with monkeypatch.context() as m:
        m.setattr(gguf_device, "load_state", lambda *a: None)
        host = nnx.to_pure_dict(nnx.state(load_model(tiny_gguf, mesh=mesh)))
    leaves = jax_leaves(device), jax_leaves(host)
    assert [k for k, _ in leaves[0]] == [k for k, _ in leaves[1]] and len(leaves[0]) == 12  # 9 stacked + 3
    for (name, a), (_, b) in zip(*leaves):
        assert a.sharding == b.sharding, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)

    from rsdjax.checkpoint import hf

    host_loads = []
    with monkeypatch.context() as m:  # replicating the raw blocks past the budget: the host path, same values
        m.setattr(gguf_device, "EXTRA_COPIES_BYTES", 0)
        m.setattr(hf, "load_hf_state", lambda *a, _f=hf.load_hf_state, **k: host_loads.append(1) or _f(*a, **k))
        again = nnx.to_pure_dict(nnx.state(load_model(tiny_gguf, mesh=mesh)))
    assert host_loads
    for (name, a), (_, b) in zip(jax_leaves(again), leaves[0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)

    calls = []
    monkeypatch.setattr(gguf_device, "load_state", lambda *a: calls.append(1) or None)
    k_quant = write_gguf(tmp_path / "q5_1.gguf", make_hf_llama(tmp_path / "hf", seed=6), types={**TYPES, "ffn_down": "Q5_1"})
    ref = AutoModelForCausalLM.from_pretrained(k_quant.parent, gguf_file=k_quant.name, dtype=torch.float32).eval()
    tokens = np.random.default_rng(2).integers(0, TINY_HF["vocab_size"], (1, 12)).astype(np.int32)
    with torch.no_grad():
        want = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert max_abs(load_model(k_quant)(tokens), want) <= 1e-4 and calls


def jax_leaves(tree):
    import jax

    return [(jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(tree)]
