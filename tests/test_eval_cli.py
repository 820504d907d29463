"""`rsdjax eval` on the real SmolLM2 against transformers: perplexity, bits per byte, greedy Q&A answers."""
import json
import math

import pytest

from conftest import ROOT

SEQ = 128
QA = [{"question": "What is the capital of France?", "answer": "Paris"},
      {"question": "How many legs does a spider have?", "answer": "Eight legs."}]


def hf_reference(hf_dir, text: str, prompts: list[list[int]], new_tokens: int):
    """(total NLL of the text in SEQ-token windows after BOS, greedy continuations) from transformers."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype="float32").eval()
    ids = [model.config.bos_token_id, *tok(text, add_special_tokens=False).input_ids]
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, SEQ):
            chunk = torch.tensor([ids[start:start + SEQ + 1]])
            logp = torch.log_softmax(model(chunk[:, :-1]).logits.double(), -1)[0]
            nll -= float(logp.gather(-1, chunk[0, 1:, None]).sum())
        answers = []
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=model.config.eos_token_id, pad_token_id=0)
            answers.append(tok.decode(out[0, len(p):], skip_special_tokens=True).strip())
    return nll, len(ids) - 1, answers


def test_eval_cli_real_model_matches_transformers(smollm2_hf_dir, tmp_path, capsys):
    from rsdjax.cli import main
    from rsdjax.sft.data import render, to_messages
    from rsdjax.tokenizer import Tokenizer

    text = (ROOT / "data/corpus/en/01_tokenizers.txt").read_text(encoding="utf-8")[:1500]
    (tmp_path / "en.txt").write_text(text, encoding="utf-8")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in QA))
    new_tokens = 12
    assert main(["eval", "--model", str(smollm2_hf_dir), f"en={tmp_path / 'en.txt'}", f"qa={qa}", "--json",
                 "--seq-len", str(SEQ), "--batch-size", "4", "--template", "plain", "--max-new-tokens",
                 str(new_tokens), "--mesh", "fsdp=2,tensor=3"]) == 0
    out = json.loads(capsys.readouterr().out)["sources"]

    tok = Tokenizer.load(smollm2_hf_dir)
    prompts = [[i for ids, _ in render(tok, to_messages(r, "qa")[:1], "plain", add_generation_prompt=True) for i in ids]
               for r in QA]
    nll, predicted, answers = hf_reference(smollm2_hf_dir, text, prompts, new_tokens)
    en = out["en"]
    assert en["predicted_tokens"] == predicted and en["bytes"] == len(text.encode())
    assert en["perplexity"] == pytest.approx(math.exp(nll / predicted), rel=1e-4)
    assert en["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)
    got = [item["answer"] for item in out["qa"]["qa"]["items"]]
    assert got == answers
    norm = lambda s: "".join(c for c in s.casefold() if c.isalnum() or c == " ").split()
    contains = sum(" ".join(norm(r["answer"])) in " ".join(norm(a)) for r, a in zip(QA, answers)) / len(QA)
    assert out["qa"]["qa"]["contains_answer"] == pytest.approx(contains)


def test_eval_cli_bad_input_is_one_line(tiny_hf_dir, tiny_tokenizer_dir, tmp_path, capsys):
    from rsdjax.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    code = main(["eval", "--model", str(tiny_hf_dir), "--tokenizer", str(tiny_tokenizer_dir), str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{bad}:2: invalid JSON" in err
    assert main(["eval", "--model", str(tiny_hf_dir), "--tokenizer", str(tiny_tokenizer_dir),
                 str(tmp_path / "missing.txt")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
