"""Evaluation step and metrics against transformers' full-forward logits; sharded == one device."""
import math

import numpy as np
import pytest

TEXTS = ["The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up.",
         "日本語のテキストです。富士山は日本で一番高い山です。", "short"]
SEQ = 16  # documents span several windows


def hf_nll(hf_model, ids: list[int]) -> float:
    """Total NLL (nats) of ids[1:] with the context restarting every SEQ tokens, from transformers' logits."""
    import torch

    total = 0.0
    for start in range(0, len(ids) - 1, SEQ):
        chunk = torch.tensor([ids[start:start + SEQ + 1]])
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(chunk[:, :-1]).logits.double(), -1)[0]
        total -= float(logp.gather(-1, chunk[0, 1:, None]).sum())
    return total


@pytest.fixture(scope="module")
def setup(tiny_hf_dir, tiny_tokenizer_dir):
    from transformers import LlamaForCausalLM

    from rsdjax.eval.data import document_prefix, text_rows
    from rsdjax.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_tokenizer_dir)
    prefix = document_prefix(tok)
    rows, stats = text_rows(tok, TEXTS, SEQ, prefix)
    hf = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype="float32").eval()
    expected = sum(hf_nll(hf, [prefix, *tok.encode(t)]) for t in TEXTS)
    return tok, rows, stats, expected


def run_eval(tiny_hf_dir, rows, stats, mesh_shape, batch_size):
    from rsdjax.eval.metrics import evaluate_rows
    from rsdjax.eval.step import EvalStep
    from rsdjax.loading import load_model
    from rsdjax.parallel.mesh import make_mesh

    mesh = make_mesh(mesh_shape)
    model = load_model(tiny_hf_dir, mesh=mesh, rules="train")
    step = EvalStep(model, mesh, batch_size=batch_size)
    return evaluate_rows(step, step.state_of(model), "text", rows, stats, batch_size)


def test_eval_matches_transformers_logits_and_formulas(tiny_hf_dir, setup):
    tok, rows, stats, expected = setup
    assert len(rows) > len(TEXTS)  # some document spans several windows
    r = run_eval(tiny_hf_dir, rows, stats, {"data": 1}, batch_size=4)
    assert r.predicted == stats.tokens == sum(len(tok.encode(t)) for t in TEXTS)
    assert r.nll == pytest.approx(expected, rel=1e-5)
    assert r.loss == pytest.approx(expected / stats.tokens, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(expected / stats.tokens), rel=1e-5)
    assert stats.bytes == sum(len(t.encode()) for t in TEXTS)
    assert r.bits_per_byte == pytest.approx(expected / math.log(2) / stats.bytes, rel=1e-5)
    assert r.chars_per_token == pytest.approx(sum(map(len, TEXTS)) / stats.tokens)


def test_eval_sharded_equals_one_device(tiny_hf_dir, setup):
    _, rows, stats, _ = setup
    one = run_eval(tiny_hf_dir, rows, stats, {"data": 1}, batch_size=4)
    sharded = run_eval(tiny_hf_dir, rows, stats, {"fsdp": 2, "tensor": 4}, batch_size=4)
    assert sharded.predicted == one.predicted
    np.testing.assert_allclose(sharded.nll, one.nll, rtol=1e-5)


def test_bits_per_byte_compares_tokenizers(tiny_tokenizer_dir):
    """Same text, two tokenizers: tokens differ, bytes do not, so bits/byte shares one denominator."""
    from rsdjax.eval.data import text_rows
    from rsdjax.eval.metrics import SourceResult
    from rsdjax.tokenizer import Tokenizer
    from rsdjax.vocab import extend_tokenizer

    base = Tokenizer.load(tiny_tokenizer_dir)
    wider = extend_tokenizer(base, TEXTS * 4, 32)
    _, a = text_rows(base, TEXTS, SEQ, base.bos_id)
    _, b = text_rows(wider, TEXTS, SEQ, wider.bos_id)
    assert b.tokens < a.tokens and a.bytes == b.bytes and a.chars == b.chars
    # a model that spends the same total code length on the text scores the same bits/byte either way
    same = [SourceResult("x", 1234.5, s.tokens, s) for s in (a, b)]
    assert same[0].bits_per_byte == same[1].bits_per_byte and same[0].loss != same[1].loss


def test_document_prefix_needs_bos(tiny_tokenizer_dir):
    from rsdjax.config import load_model_config
    from rsdjax.eval.data import EvalDataError, document_prefix
    from rsdjax.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_tokenizer_dir)
    assert document_prefix(tok) == tok.bos_id
    cfg = load_model_config("tiny", ["bos_token_id=null"])
    # without a BOS in the tokenizer the model config's bos_token_id starts documents; without both, an error
    nobos = Tokenizer(tok.hf, tok.path)
    nobos.__class__ = type("NoBos", (Tokenizer,), {"bos_id": property(lambda self: None)})
    assert document_prefix(nobos, load_model_config("tiny")) == load_model_config("tiny").bos_token_id
    with pytest.raises(EvalDataError, match="no BOS token"):
        document_prefix(nobos, cfg)
