"""The real SmolLM2-135M-Instruct GGUF, loaded by rsdjax's own GGUF reader, against transformers
reading the same file: weights, logits, tokenizer, chat template, greedy chat on three meshes, and the
server through the official `openai` client. One HF reference model and one rsdjax engine per mesh.
"""
import numpy as np
import pytest

from conftest import max_abs

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "system", "content": "You are a pirate. Answer like one."},
     {"role": "user", "content": "How are you today?"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."},
     {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
NEW_TOKENS = 16
TEXTS = ["Hello world! The year 2024 had 366 days; naïve café  tabs\there\n\nnew lines, 日本語 and emoji 🙂.",
         "<|im_start|>user\nspecial tokens stay whole<|im_end|>", "   leading spaces and 1234567890"]


@pytest.fixture(scope="module")
def hf(smollm2_hf_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)  # torch's default thread count spins badly on a shared 2-core machine
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="module")
def hf_answers(hf):
    """transformers' apply_chat_template + greedy generate, per conversation: (prompt ids, answer ids)."""
    import torch

    model, tok = hf
    out = []
    for messages in CONVERSATIONS:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append((ids, gen[0, len(ids):].tolist()))  # with the EOS that ended it, as rsdjax reports it
    return out


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from rsdjax.tokenizer import Tokenizer

    return Tokenizer.load(smollm2_gguf)


def test_gguf_weights_and_logits_match_transformers(smollm2_gguf, hf):
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from rsdjax.loading import load_model

    model = load_model(smollm2_gguf)
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    ref_model, ref_tok = hf
    ref = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    params = nnx.state(model, nnx.Param)
    # Q/K rows un-permuted exactly as transformers does (bit-identical dequantized weights)
    wq = np.asarray(params["wq"][...][7])  # [E, H, D]
    assert np.array_equal(wq.reshape(cfg.hidden_size, -1).T, ref["model.layers.7.self_attn.q_proj.weight"])
    wk = np.asarray(params["wk"][...][29])
    assert np.array_equal(wk.reshape(cfg.hidden_size, -1).T, ref["model.layers.29.self_attn.k_proj.weight"])
    assert np.array_equal(np.asarray(params["embed"][...]), ref["model.embed_tokens.weight"])
    ids = ref_tok(TEXTS[0], add_special_tokens=False).input_ids
    with torch.no_grad():
        want = ref_model(torch.tensor([ids])).logits.numpy()
    got = np.asarray(model(jnp.asarray([ids], jnp.int32)))
    # f32 on both sides; what is left is summation order over 30 layers (|logits| ~ 20)
    assert max_abs(got, want) <= 5e-4, max_abs(got, want)
    assert max_abs(got, want) <= 2e-5 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_gguf_tokenizer_and_template_match_transformers(tokenizer, hf):
    _, ref = hf
    for text in TEXTS:
        assert tokenizer.encode(text) == ref(text, add_special_tokens=False).input_ids, text
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert tokenizer.eos_id == ref.eos_token_id and tokenizer.add_bos is False
    for messages in CONVERSATIONS:
        for gen_prompt in (True, False):
            want = ref.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True, return_dict=False)
            assert tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt) == want
            assert tokenizer.render_chat(messages, gen_prompt) == ref.apply_chat_template(
                messages, add_generation_prompt=gen_prompt, tokenize=False)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [{}, {"tensor": 3}, {"data": 2}], ids=["one-device", "tensor3", "data2"])
def test_greedy_chat_matches_transformers(smollm2_gguf, hf_answers, tokenizer, mesh_shape):
    from rsdjax.infer.engine import load_engine
    from rsdjax.infer.generate import generate
    from rsdjax.infer.interface import SamplingParams
    from rsdjax.parallel.mesh import make_mesh

    engine, tok = load_engine(smollm2_gguf, mesh=make_mesh(mesh_shape), max_slots=len(CONVERSATIONS) + 1,
                              max_context=256)
    prompts = [tok.apply_chat_template(m) for m in CONVERSATIONS]
    assert prompts == [p for p, _ in hf_answers]
    done = generate(engine, prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), tokenizer=tok)
    for c, (_, want) in zip(done, hf_answers):
        assert c.token_ids == want, (tok.decode(c.token_ids), tok.decode(want))
    if mesh_shape == {"tensor": 3}:
        _served_chat_matches(engine, tok, hf_answers)


def _served_chat_matches(engine, tok, hf_answers):
    """The same answers through `rsdjax serve`'s app and the official openai client, streamed and not,
    all ten requests at once (so they share decode steps, as served requests do)."""
    from concurrent.futures import ThreadPoolExecutor

    from rsdjax.serve.app import create_app
    from rsdjax.serve.launch import ServerThread
    from serve_support import client

    def whole(messages):
        got = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=NEW_TOKENS, temperature=0)
        return got.choices[0].message.content, got.usage.completion_tokens

    def streamed(messages):
        stream = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=NEW_TOKENS,
                                             temperature=0, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with ServerThread(create_app(engine, tok, ["smollm2"])) as server, ThreadPoolExecutor(2 * len(CONVERSATIONS)) as pool:
        api = client(server.url)
        wholes = [pool.submit(whole, m) for m in CONVERSATIONS]
        streams = [pool.submit(streamed, m) for m in CONVERSATIONS]
        for (_, want), w, st in zip(hf_answers, wholes, streams):
            text = tok.decode(want)
            assert w.result() == (text, len(want))  # the EOS counts as a completion token, as in vLLM
            assert st.result() == text
