"""TEDLLM on the real model: `rsdjax tokenizer extend` on SmolLM2's own tokenizer, then the demo's
recipe (configs/train/cpt-smollm2-ja.yaml) for a few steps through `rsdjax train`."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Tokyo?"},
                {"role": "assistant", "content": "The capital of Japan."}]


def _cli(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "rsdjax.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_extend_real_tokenizer_then_continue_pretraining(smollm2_hf_dir, tmp_path):
    from rsdjax.loading import read_model_config
    from rsdjax.tokenizer import Tokenizer

    ext_dir = tmp_path / "tok-ext"
    _cli("tokenizer", "extend", smollm2_hf_dir, ROOT / "data" / "corpus" / "ja", "--add", "64", "-o", ext_dir)
    base, ext = Tokenizer.load(smollm2_hf_dir), Tokenizer.load(ext_dir)
    assert ext.vocab_size == base.vocab_size + 64
    base_vocab = base.hf.get_vocab(with_added_tokens=True)
    assert all(ext.token_id(t) == i for t, i in base_vocab.items())  # every old id unchanged
    # the extended directory still chats exactly as the original
    assert ext.special("eos_token") == base.special("eos_token") == "<|im_end|>"
    assert ext.render_chat(CONVERSATION, False) == base.render_chat(CONVERSATION, False)
    assert ext.apply_chat_template(CONVERSATION) == base.apply_chat_template(CONVERSATION)
    assert ext.chat_ids_and_mask(CONVERSATION) == base.chat_ids_and_mask(CONVERSATION)


def test_real_cpt_recipe_few_steps(smollm2_hf_dir, tmp_path):
    """The recipe `make demo` runs, cut to 3 steps: held-out characters per token rise over SmolLM2's own
    tokenizer, and held-out bits per byte of both sources are computed at the end."""
    from rsdjax.eval.held_out import hold_out_files
    from rsdjax.tokenizer import Tokenizer
    from rsdjax.train.config import load_train_config
    from rsdjax.vocab import chars_per_token, read_texts

    run_dir, ext_dir = tmp_path / "run", tmp_path / "tok-ext"
    overrides = [f"run_dir={run_dir}", f"init_from={smollm2_hf_dir}", f"tokenizer.path={ext_dir}",
                 f"tokenizer.base={smollm2_hf_dir}", "steps=3", "embedding_steps=1", "eval.every=0",
                 "checkpoint.every=3", "log.every=1"]
    _cli("train", "cpt-smollm2-ja", *overrides, timeout=600)
    cfg = load_train_config("cpt-smollm2-ja", overrides)
    _, held = hold_out_files(cfg.data.sources, cfg.eval.holdout)
    held_files = {s.name: s.paths for s in held}
    extension_texts = read_texts(cfg.tokenizer.build.extend_corpus, held_files["ja"])
    assert extension_texts and len(extension_texts) < len(read_texts(cfg.tokenizer.build.extend_corpus))

    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [3]  # at_start is off: the demo's "before" is the original model
    after = rows[-1]["eval"]
    assert set(after) == {"ja", "en-replay"}
    base = Tokenizer.load(smollm2_hf_dir)
    ja_before = chars_per_token(base, read_texts(held_files["ja"]))
    assert after["ja"]["chars_per_token"] > ja_before * 1.15, (ja_before, after["ja"])
    for name, m in after.items():
        assert 0.3 < m["bits_per_byte"] < 5 and m["bytes"] > 1000, (name, m)
    ext = Tokenizer.load(ext_dir)
    assert ext.vocab_size == base.vocab_size + cfg.tokenizer.build.add
