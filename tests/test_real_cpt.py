"""TEDLLM on the real model: `rsdjax tokenizer extend` on SmolLM2's own tokenizer, then `rsdjax train`
from SmolLM2 with that tokenizer on the bundled Japanese corpus."""
import json
import subprocess
import sys

import pytest
import yaml

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

    run_dir = tmp_path / "run"
    config = {
        "name": "cpt-smollm2", "run_dir": str(run_dir), "init_from": str(smollm2_hf_dir),
        "tokenizer": {"path": str(ext_dir), "base": str(smollm2_hf_dir)},
        "data": {"seq_len": 64, "sources": [{"name": "ja", "paths": [str(ROOT / "data" / "corpus" / "ja")]}]},
        "optim": {"lr": 1e-4, "warmup_steps": 1}, "steps": 2, "batch_size": 2, "vocab_multiple": 192,
        "mesh": "fsdp=2,tensor=3", "checkpoint": {"every": 2, "keep": 1}, "log": {"every": 1, "tensorboard": False},
    }
    cfg_file = tmp_path / "cpt.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    _cli("train", cfg_file, timeout=1500)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), losses
    final = next(p for p in (run_dir / "model", run_dir / "final") if p.exists())
    cfg = read_model_config(final)
    assert cfg.vocab_size >= ext.vocab_size and cfg.vocab_size % 192 == 0 and cfg.num_layers == 30
