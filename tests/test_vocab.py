"""Tokenizer training/extension and vocabulary resize (rsdjax.vocab, `rsdjax tokenizer`)."""
from pathlib import Path

import numpy as np
import pytest

from rsdjax.tokenizer import SPECIAL_TOKENS, Tokenizer
from rsdjax.model.resize import new_token_pieces, resize_vocab
from rsdjax.vocab import VocabError, chars_per_token, check_extension, extend_tokenizer, read_texts, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
JA, EN = ROOT / "data/corpus/ja", ROOT / "data/corpus/en"


@pytest.fixture(scope="module")
def texts():
    return {"ja": read_texts([JA]), "en": read_texts([EN])}


@pytest.fixture(scope="module")
def base(texts):
    """An English-only tokenizer, standing in for Llama-3's English-centric one."""
    return train_tokenizer(texts["en"], 512)


@pytest.fixture(scope="module")
def extended(base, texts):
    return extend_tokenizer(base, texts["ja"], 256)


def test_trained_tokenizer_has_llama3_specials_and_round_trips(base, texts):
    assert base.vocab_size == 512
    for tok in SPECIAL_TOKENS:
        assert base.token_id(tok) is not None
    for text in texts["ja"][:2] + texts["en"][:2]:
        assert base.decode(base.encode(text)) == text
    assert base.eos_ids == [base.token_id("<|end_of_text|>"), base.token_id("<|eot_id|>")]


def test_extension_keeps_every_old_id_and_appends_new_ones(base, extended):
    old_vocab = base.hf.get_vocab(with_added_tokens=True)
    new_vocab = extended.hf.get_vocab(with_added_tokens=True)
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    added = sorted(i for t, i in new_vocab.items() if t not in old_vocab)
    assert added == list(range(base.vocab_size, base.vocab_size + 256))
    check_extension(base, extended)  # the library's own check agrees


def test_extension_compresses_japanese_and_leaves_english_alone(base, extended, texts):
    ja_before, ja_after = chars_per_token(base, texts["ja"]), chars_per_token(extended, texts["ja"])
    en_before, en_after = chars_per_token(base, texts["en"]), chars_per_token(extended, texts["en"])
    assert ja_after > 2 * ja_before
    assert en_after == pytest.approx(en_before, rel=0.02)
    for text in texts["ja"]:
        assert extended.decode(extended.encode(text)) == text


def test_new_tokens_are_reachable_by_the_merge_order(base, extended, texts):
    """Continued BPE: (almost) every learned token is produced when encoding the corpus it came from."""
    used = {i for e in extended.hf.encode_batch(texts["ja"], add_special_tokens=False) for i in e.ids}
    new = set(range(base.vocab_size, extended.vocab_size))
    # a token merged into a longer one everywhere it occurs is legitimately unused; that is rare
    assert len(used & new) >= 0.9 * len(new)


def test_extension_matches_transformers_fast_tokenizer(extended, texts, tmp_path):
    from transformers import PreTrainedTokenizerFast

    extended.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in texts["ja"][:3] + texts["en"][:1]:
        assert hf.encode(text, add_special_tokens=False) == extended.encode(text)


def test_extension_is_deterministic(base, extended, texts):
    again = extend_tokenizer(base, texts["ja"], 256)
    assert again.hf.get_vocab(with_added_tokens=True) == extended.hf.get_vocab(with_added_tokens=True)


def test_bad_extension_requests(base):
    with pytest.raises(VocabError, match="empty corpus"):
        extend_tokenizer(base, ["", ""], 10)
    with pytest.raises(VocabError, match="positive"):
        extend_tokenizer(base, ["text"], 0)
    with pytest.raises(VocabError, match="empty corpus"):
        train_tokenizer([], 512)


def test_check_extension_rejects_a_retrained_tokenizer(base, texts):
    other = train_tokenizer(texts["ja"], 600)
    with pytest.raises(VocabError, match="not an extension"):
        check_extension(base, other)


def _expected_rows(table, base, extended, new_size):
    """The documented rule, computed independently in float64: old rows copied, new = mean of old pieces,
    padding = mean of all old rows."""
    old_vocab = base.hf.get_vocab(with_added_tokens=True)
    mean_all = table[:base.vocab_size].astype(np.float64).mean(0)
    out = np.tile(mean_all, (new_size, 1))
    out[:base.vocab_size] = table[:base.vocab_size]
    for token, i in extended.hf.get_vocab(with_added_tokens=True).items():
        if token not in old_vocab:
            pieces = [t.id for t in base.hf.model.tokenize(token)]  # the old tokenizer's split of its bytes
            assert "".join(base.hf.id_to_token(p) for p in pieces) == token and len(pieces) >= 2
            out[i] = table[pieces].astype(np.float64).mean(0)
    return out


@pytest.mark.parametrize("mesh_shape", [{}, {"fsdp": 2, "tensor": 4}])
def test_resize_vocab_documented_initial_values(base, extended, mesh_shape):
    import dataclasses

    import jax
    from flax import nnx

    from rsdjax.config import load_model_config
    from rsdjax.loading import abstract_model
    from rsdjax.model.llama import Llama
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.parallel.sharding import create_sharded, state_shardings

    cfg = load_model_config("tiny")  # vocab 512 = the base tokenizer
    mesh = make_mesh(mesh_shape)
    model = create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(3)), mesh, "train")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    target = abstract_model(dataclasses.replace(cfg, vocab_size=768))
    shardings = nnx.to_pure_dict(state_shardings(nnx.split(target)[1], mesh, "train"))
    out, new_cfg = resize_vocab(params, cfg, base, extended, multiple=128, shardings=shardings)

    assert new_cfg.vocab_size == 768 and extended.vocab_size == 768
    embed, head = np.asarray(params["embed"]), np.asarray(params["lm_head"])
    new_embed, new_head = np.asarray(out["embed"]), np.asarray(out["lm_head"])
    assert new_embed.shape == (768, cfg.hidden_size) and new_head.shape == (cfg.hidden_size, 768)
    assert np.array_equal(new_embed[:512], embed)  # old rows bit for bit
    assert np.array_equal(new_head[:, :512], head)
    np.testing.assert_allclose(new_embed, _expected_rows(embed, base, extended, 768), rtol=0, atol=2e-6)
    np.testing.assert_allclose(new_head.T, _expected_rows(head.T, base, extended, 768), rtol=0, atol=2e-6)
    assert out["embed"].sharding == shardings["embed"]
    for name in params:  # nothing else changes
        if name not in ("embed", "lm_head"):
            assert np.array_equal(np.asarray(out[name]), np.asarray(params[name]))
    assert jax.tree.structure(out) == jax.tree.structure(params)


def test_resize_pads_to_multiple_with_mean_rows(base, texts):
    import jax.numpy as jnp

    from rsdjax.config import load_model_config

    ext = extend_tokenizer(base, texts["ja"], 100)  # 612 tokens -> padded to 640
    cfg = load_model_config("tiny")
    rng = np.random.default_rng(0)
    params = {"embed": jnp.asarray(rng.normal(size=(512, 8)).astype(np.float32))}
    out, new_cfg = resize_vocab(params, cfg, base, ext, multiple=128)
    assert new_cfg.vocab_size == 640
    pad = np.asarray(out["embed"])[612:]
    np.testing.assert_allclose(pad, np.tile(np.asarray(params["embed"]).mean(0), (28, 1)), atol=1e-6)
    assert len(new_token_pieces(base, ext)) == 100


def test_tokenizer_cli_train_extend_resize(tmp_path, tiny_hf_dir, capsys):
    from rsdjax.cli import main
    from rsdjax.loading import load_model

    assert main(["tokenizer", "train", str(EN), "--vocab-size", "512", "-o", str(tmp_path / "base")]) == 0
    assert main(["tokenizer", "extend", str(tmp_path / "base"), str(JA), "--add", "64", "-o", str(tmp_path / "ext")]) == 0
    out = capsys.readouterr().out
    assert "512 -> 576 tokens" in out and "characters per token on the corpus" in out
    ext = Tokenizer.load(tmp_path / "ext")
    assert ext.vocab_size == 576
    # the tiny HF model has vocab 512: resize it to the extended tokenizer
    assert main(["tokenizer", "resize-model", str(tiny_hf_dir), "--old-tokenizer", str(tmp_path / "base"),
                 "--new-tokenizer", str(tmp_path / "ext"), "-o", str(tmp_path / "resized")]) == 0
    model = load_model(tmp_path / "resized")
    assert model.cfg.vocab_size == 640
    assert Tokenizer.load(tmp_path / "resized").vocab_size == 576
    # the base tokenizer read from a model (--model) is the positional base's
    for argv, out in (([str(tmp_path / "resized")], "pos"), (["--model", str(tmp_path / "resized")], "flag")):
        assert main(["tokenizer", "extend", *argv, str(JA), "--add", "8", "-o", str(tmp_path / out)]) == 0
    assert (tmp_path / "pos" / "tokenizer.json").read_bytes() == (tmp_path / "flag" / "tokenizer.json").read_bytes()
    assert Tokenizer.load(tmp_path / "flag").vocab_size == 584
    assert main(["tokenizer", "extend", "--model", str(tiny_hf_dir), str(JA), "--add", "8", "-o", str(tmp_path / "x")]) == 2
    # refusing to overwrite is an error exit, not a crash
    assert main(["tokenizer", "extend", str(tmp_path / "base"), str(JA), "--add", "8", "-o", str(tmp_path / "ext")]) == 2
