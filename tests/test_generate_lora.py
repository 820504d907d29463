"""`rsdjax generate --lora`: greedy tokens with a PEFT adapter == peft + transformers generate."""
import json

import torch

from infer_support import confident_hf_dir, hf_model
from rsdjax.cli import main

PROMPT = [1, 17, 200, 33, 90, 4]


def test_generate_with_peft_adapter_matches_peft_on_transformers(tmp_path_factory, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    base = confident_hf_dir(tmp_path_factory)
    torch.manual_seed(0)
    peft_model = get_peft_model(hf_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # B starts at zero: give it values, as training would
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model.eval().generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                                              min_new_tokens=12)[0, len(PROMPT):].tolist()
        plain = hf_model(base).generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                                        min_new_tokens=12)[0, len(PROMPT):].tolist()
    assert expected != plain  # the adapter changes what is generated, so the comparison means something

    capsys.readouterr()
    assert main(["generate", "--model", str(base), "--lora", str(tmp_path / "adapter"), "--prompt-ids",
                 ",".join(map(str, PROMPT)), "--max-new-tokens", "12", "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completions"][0]["token_ids"] == expected
