"""SFT data (loss masks, packing, errors), the LoRA training step, greedy answers, `rsdjax finetune`."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, max_abs
from rsdjax.cli import main
from rsdjax.config import ConfigError
from rsdjax.loading import load_model
from rsdjax.checkpoint.peft import apply_adapter
from rsdjax.model.lora import LoRAParam, LoraConfig, attach_lora
from rsdjax.parallel.mesh import make_mesh
from rsdjax.sft import SFTDataError, answer, load_finetune_config, sft_loss
from rsdjax.sft.data import batches, encode, load_examples, pack, read_jsonl
from rsdjax.train.config import OptimConfig
from rsdjax.train.optimizer import make_optimizer
from rsdjax.train.step import TrainStep

QA = [{"question": "What is the capital of Japan?", "answer": "Tokyo."},
      {"question": "日本で一番高い山は？", "answer": "富士山です。",
       "system": "簡潔に答えてください。"},
      {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "What is LoRA?"},
                    {"role": "assistant", "content": "Low-rank adapters."}]}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_qa_and_chat_lines(tmp_path, tok):
    convs = read_jsonl(write_jsonl(tmp_path / "qa.jsonl", QA))
    assert [m["role"] for m in convs[1]] == ["system", "user", "assistant"]
    assert [m["role"] for m in convs[2]] == ["user", "assistant", "user", "assistant"]
    assert len(read_jsonl(ROOT / "data/qa/train.jsonl")) >= 100


def test_english_demo_set_is_the_english_pairs_of_the_training_set():
    import re

    def japanese(r):
        return re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", r["question"] + r["answer"])

    lines = lambda name: [json.loads(x) for x in (ROOT / "data/qa" / name).read_text(encoding="utf-8").splitlines()]
    english = [r for r in lines("train.jsonl") if "question" in r and not japanese(r)]
    assert lines("train-en.jsonl") == english and len(english) == 79


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answer": "a"', "invalid JSON"),
    ('["q", "a"]', "expected a JSON object"),
    ('{"question": "q"}', "needs string 'question' and 'answer'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 needs role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QA[0]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SFTDataError, match=f"{path}:3: {message}"):
        read_jsonl(path)


def test_empty_or_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SFTDataError, match="empty.jsonl: no examples"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(SFTDataError, match="no such data file"):
        read_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("template", ["llama3", "plain"])
def test_loss_mask_covers_exactly_the_answers(tmp_path, tok, template):
    (qa, _, chat) = read_jsonl(write_jsonl(tmp_path / "qa.jsonl", QA))
    ex = encode(tok, qa, template)
    eot = tok.token_id("<|eot_id|>") if template == "llama3" else tok.eos_ids[0]
    assert ex.targets[ex.loss_mask].tolist() == tok.encode(("" if template == "llama3" else " ") + "Tokyo.") + [eot]
    assert np.array_equal(ex.tokens[1:], ex.targets[:-1])
    ex = encode(tok, chat, template)
    answers = [t for t in ex.targets[ex.loss_mask].tolist() if t != eot]
    assert tok.decode(answers).replace(" ", "") == "Hello!Low-rankadapters."


def test_prompt_tokens_carry_no_loss(tmp_path, tiny_hf_dir, tok):
    model = load_model(tiny_hf_dir)
    examples, _ = load_examples(write_jsonl(tmp_path / "qa.jsonl", QA), tok, seq_len=96)
    batch = {k: jnp.asarray(v) for k, v in pack(examples, 96, pack_examples=False).items()}
    key = jax.random.PRNGKey(0)
    loss = float(sft_loss(model, batch, key)[0])
    rng = np.random.default_rng(0)
    prompt = ~np.asarray(batch["loss_mask"])
    scrambled = np.where(prompt, rng.integers(0, 512, prompt.shape), batch["targets"]).astype(np.int32)
    assert float(sft_loss(model, {**batch, "targets": jnp.asarray(scrambled)}, key)[0]) == loss
    grads = jax.grad(lambda logits: sft_loss(_Fixed(logits), batch, key)[0])(model(batch["tokens"], batch["positions"],
                                                                              batch["segment_ids"]))
    assert not np.any(np.asarray(grads)[prompt]) and np.any(np.asarray(grads)[~prompt])


class _Fixed:
    """A 'model' returning given logits, to take the gradient of the loss with respect to them."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, *args, **kwargs):
        return self.logits


def test_packing_keeps_examples_apart(tmp_path, tiny_hf_dir, tok):
    """Each packed example gets the logits it gets alone: no attention across segments, positions restart."""
    model = load_model(tiny_hf_dir)
    examples, _ = load_examples(write_jsonl(tmp_path / "qa.jsonl", QA * 2), tok, seq_len=256)
    rows = pack(examples, 256)
    assert len(rows["tokens"]) < len(examples)  # some rows hold several examples
    packed = np.asarray(model(jnp.asarray(rows["tokens"]), jnp.asarray(rows["positions"]),
                              jnp.asarray(rows["segment_ids"])))
    alone = {len(e.tokens): np.asarray(model(jnp.asarray(e.tokens[None])))[0] for e in examples}
    found = 0
    for r in range(len(rows["tokens"])):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        assert not rows["loss_mask"][r][seg == 0].any()  # padding carries no loss
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(pos[idx], np.arange(len(idx))) and np.all(np.diff(idx) == 1)
            ex = next(e for e in examples
                      if len(e.tokens) == len(idx) and np.array_equal(e.tokens, rows["tokens"][r][idx]))
            assert np.array_equal(rows["targets"][r][idx], ex.targets)
            assert max_abs(packed[r, idx], alone[len(idx)]) <= 1e-5
            found += 1
    assert found == len(examples)


def test_batches_see_every_example_each_epoch(tok):
    from rsdjax.sft.data import Example

    examples = [Example(np.full(5 + i % 7, i, np.int32), np.full(5 + i % 7, i, np.int32), np.ones(5 + i % 7, bool))
                for i in range(40)]
    it = batches(examples, 32, 2, seed=0)
    seen = np.concatenate([next(it)["tokens"].ravel() for _ in range(6)])
    assert set(seen[seen > 0]) == set(range(1, 40))


def test_training_changes_only_lora(tmp_path, tiny_hf_dir, tok):
    """After some steps: loss falls, LoRA rows of adapted layers moved, everything else bit-identical."""
    model = load_model(tiny_hf_dir, mesh=make_mesh({}), rules="train")
    attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                                  layers_to_transform=[1]))
    frozen_filter = nnx.All(nnx.Not(LoRAParam), nnx.Not(nnx.RngState))  # base weights + LoRA scales
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, frozen_filter)))
    lora_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, LoRAParam)))
    examples, _ = load_examples(write_jsonl(tmp_path / "qa.jsonl", QA), tok, seq_len=64)
    tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0), 12)
    model.train()
    step = TrainStep(model, tx, make_mesh({}), trainable=LoRAParam, loss_fn=sft_loss)
    params, frozen = step.split(model)
    state, losses = step.init(params), []
    data = batches(examples, 64, 2, pack_examples=False)
    for _ in range(12):
        state, metrics = step(state, frozen, {k: jnp.asarray(v) for k, v in next(data).items()})
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    model = step.merge(state.params, frozen)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, frozen_filter)))
    assert "wq" in after and jax.tree.all(jax.tree.map(np.array_equal, after, before))  # base is bit-identical
    lora_after = nnx.state(model, LoRAParam)["lora"]
    for k in ("wq", "wv", "w_down"):
        b = np.asarray(lora_after["b"][k][...])
        assert np.any(b[1]) and not np.any(b[0])  # layer 0 is not adapted: its rows stay zero
        assert not np.array_equal(np.asarray(lora_after["a"][k][...])[1], lora_before["lora"]["a"][k][1])
    # the optimizer state holds Adam's mu and nu for the 6 LoRA factors, nothing of the base
    opt_arrays = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert opt_arrays == sorted(2 * [x.shape for x in jax.tree.leaves(lora_before)])


def test_answer_matches_transformers_greedy(tiny_hf_dir, tok):
    import torch
    from transformers import LlamaForCausalLM

    model = load_model(tiny_hf_dir)
    questions = ["What is LoRA?", "日本の首都は？"]
    ours = answer(model, tok, questions, max_new_tokens=8)
    hf = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    for q, text in zip(questions, ours):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}])
        ids = torch.tensor([prompt])  # explicit mask: BOS is id 0, which HF would otherwise take for padding
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=tok.eos_ids, pad_token_id=tok.eos_ids[0])
        assert text == tok.decode(out[0, len(prompt):].tolist()).strip()


# ---------------------------------------------------------------- config and CLI


def test_finetune_config_errors():
    cfg = load_finetune_config("lora-qa-demo", ["steps=7", "lora.target_modules=[q_proj]"])
    assert cfg.steps == 7 and cfg.lora.target_modules == ["q_proj"] and cfg.data.train.endswith("train.jsonl")
    for overrides, message in ((["optim.warmup_steps=-1"], "warmup_steps"), (["data.template=chatml"], "template"),
                               (["lora.rank=4"], "unknown config key 'lora.rank'"), (["lora.r=0"], "lora.r must be"),
                               (["optim.learning_rate=1e-3"], "'optim.learning_rate' is now 'optim.lr'"),
                               (["optim.steps=7"], "'optim.steps' is now 'steps'"),
                               (["optim.grad_clip=1"], "'optim.grad_clip' is now 'optim.clip_norm'")):
        with pytest.raises(ConfigError, match=message):
            load_finetune_config("lora-qa-demo", overrides)


@pytest.mark.slow
def test_finetune_cli_end_to_end(tmp_path, tiny_hf_dir, tiny_tokenizer_dir, capsys):
    """`rsdjax finetune` on an rsdjax checkpoint (sharded fsdp=2,tensor=4), then `rsdjax lora merge`."""
    import torch
    from transformers import LlamaForCausalLM

    from rsdjax.loading import save_model

    base = save_model(load_model(tiny_hf_dir), tmp_path / "base")
    out = tmp_path / "adapter"
    args = ["finetune", "lora-qa-demo", f"base={base}", f"tokenizer={tiny_tokenizer_dir}", f"output={out}",
            "steps=4", "optim.warmup_steps=1", "batch_size=8", "log_every=2", "eval_every=2",
            "save_every=2", "data.seq_len=128", "max_new_tokens=4", "demo_questions=['What is LoRA?']",
            "--mesh", "fsdp=2,tensor=4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Q: What is LoRA?" in printed and "after:" in printed
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # every step (the terminal shows every log_every)
    assert [r["step"] for r in logged if "eval_loss" in r] == [2, 4]
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()
    model = apply_adapter(load_model(base), out)
    assert sorted(model.lora.layers) == ["w_down", "w_gate", "w_up", "wk", "wo", "wq", "wv"]
    tokens = np.random.default_rng(0).integers(0, 512, (1, 16)).astype(np.int32)
    assert main(["lora", "merge", str(base), str(out), str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(torch.from_numpy(
            tokens.astype(np.int64))).logits.numpy()
    assert max_abs(merged, model(jnp.asarray(tokens))) <= 1e-4

    saved = (out / "adapter_model.safetensors").read_bytes()
    assert main(args) == 0  # the same command again: the run is complete, nothing is redone or rewritten
    assert "already complete at step 4" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").read_bytes() == saved
