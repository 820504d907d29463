"""`rsdjax generate` end to end, `scripts/infer.py`, and a smoke run of `scripts/bench_infer.py`."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from infer_support import confident_dir_with_tokenizer, confident_hf_dir, hf_model
from rsdjax.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return confident_hf_dir(tmp_path_factory)


def run_json(capsys, *argv):
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_token_ids_match_hf(capsys, model_dir):
    import torch

    out = run_json(capsys, "--model", str(model_dir), "--prompt-ids", "5,17,301,42", "--prompt-ids", "9,8",
                   "--max-new-tokens", "12", "--ignore-eos", "--mesh", "tensor=8")
    assert out["mesh"]["tensor"] == 8 and len(out["completions"]) == 2
    hf = hf_model(model_dir)
    for completion, prompt in zip(out["completions"], ([5, 17, 301, 42], [9, 8])):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt):]
        assert completion["prompt_ids"] == prompt
        assert completion["token_ids"] == expected.tolist()
        assert completion["finish_reason"] == "length" and completion["text"] is None
        assert completion["ttft_s"] > 0 and completion["decode_tokens_per_s"] > 0
    assert out["generated_tokens"] == 24 and out["tokens_per_s"] > 0


def test_generate_text_prompt_streams_and_json_has_text(capsys, tmp_path_factory, tiny_tokenizer_dir):
    from rsdjax.tokenizer import Tokenizer

    model_dir = confident_dir_with_tokenizer(tmp_path_factory, tiny_tokenizer_dir)
    tokenizer = Tokenizer.load(model_dir)
    args = ["--model", str(model_dir), "--prompt", "The quick brown", "--max-new-tokens", "10", "--ignore-eos",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    out = run_json(capsys, *args)
    (c,) = out["completions"]
    assert c["prompt_ids"] == tokenizer.encode("The quick brown", add_bos=True)
    assert c["text"] == tokenizer.decode(c["token_ids"]) and len(c["token_ids"]) == 10
    assert main(["generate", *args]) == 0  # streaming to the terminal; same seed, same text
    streamed = capsys.readouterr()
    assert streamed.out == c["text"] + "\n"
    assert "tokens/s" in streamed.err and "first token after" in streamed.err


def test_generate_bad_input_is_one_line_and_exit_2(capsys, model_dir):
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", ",".join(["7"] * 250),
                 "--max-new-tokens", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsdjax generate: error:") and "exceeds the context of 256 tokens" in err
    assert len(err.splitlines()) == 1
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1,x"]) == 2
    assert "not a comma-separated list" in capsys.readouterr().err


@pytest.mark.slow
def test_infer_script_runs_in_a_fresh_process(model_dir):
    """scripts/infer.py as a user runs it (its own JAX start-up, virtual devices for --mesh)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "infer.py"), "--model", str(model_dir),
                           "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--mesh", "data=2,tensor=2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["completions"][0]["token_ids"]) == 5


@pytest.mark.slow
def test_bench_infer_quick_writes_its_json(tmp_path):
    out = tmp_path / "infer.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_infer.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["bandwidth"]["bytes_per_s"] > 0
    for run in result["runs"]:
        for side in ("rsdjax", "hf"):
            assert run[side]["tokens_per_s"] > 0 and run[side]["ttft_s"] > 0 and run[side]["tpot_s"] > 0
        assert run["speedup_vs_hf"] > 0 and 0 < run["fraction_of_decode_limit"]
