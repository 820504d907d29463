"""Held-out evaluation inside training: logged per source, equal to `rsdjax eval`, and never changes the run."""
import json

import numpy as np
import pytest

from conftest import ROOT

STEPS = 4


def config(tmp_path, tokenizer_dir, name, with_eval: bool):
    from rsdjax.train.config import train_config_from_dict

    data = {
        "name": name, "run_dir": str(tmp_path / name),
        "model": {"preset": "tiny", "num_layers": 1},
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"seq_len": 32, "sources": [{"name": "ja", "paths": [str(ROOT / "data/corpus/ja")], "weight": 0.8},
                                             {"name": "en", "paths": [str(ROOT / "data/corpus/en")], "weight": 0.2}]},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "steps": STEPS, "embedding_steps": 1, "batch_size": 8, "grad_accum": 2, "mesh": "fsdp=2,tensor=4",
        "checkpoint": {"every": 100, "keep": 1, "async_save": False}, "log": {"every": 1, "progress": False},
    }
    if with_eval:
        held = tmp_path / "held_out"
        held.mkdir(exist_ok=True)
        (held / "ja.txt").write_text((ROOT / "data/corpus/ja/07_fuji.txt").read_text(encoding="utf-8")[:400])
        (held / "en.txt").write_text((ROOT / "data/corpus/en/05_rivers.txt").read_text(encoding="utf-8")[:400])
        data["eval"] = {"every": 2, "sources": [{"name": "ja", "paths": [str(held / "ja.txt")]},
                                                {"name": "en-replay", "paths": [str(held / "en.txt")]}]}
    return train_config_from_dict(data)


def scalar_tags(path) -> set[str]:
    """Scalar tags in a TensorBoard event file (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, tags, i = path.read_bytes(), set(), 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = Event.FromString(data[i + 12:i + 12 + n])
        tags |= {v.tag for v in event.summary.value}
        i += 16 + n
    return tags


def test_eval_in_training_is_logged_and_changes_nothing(tmp_path, tiny_tokenizer_dir, capsys):
    import jax

    from rsdjax.cli import main
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.train.checkpoint import read_state
    from rsdjax.train.loop import train

    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    runs = {}
    for name, with_eval in (("plain", False), ("evaluated", True)):
        cfg = config(tmp_path, tiny_tokenizer_dir, name, with_eval)
        assert train(cfg, mesh, log=lambda m: None).finished
        runs[name] = tmp_path / name
    step_a, a, meta_a = read_state(runs["plain"] / "checkpoints")
    step_b, b, meta_b = read_state(runs["evaluated"] / "checkpoints")
    assert step_a == step_b == STEPS
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(x, y), jax.tree_util.keystr(path)  # params, Adam moments, RNG: bit for bit
    rows = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows(runs["plain"])] == [r["loss"] for r in rows(runs["evaluated"])]

    evals = [json.loads(line) for line in (runs["evaluated"] / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]  # before training, every 2 steps, the end
    assert not (runs["plain"] / "eval.jsonl").exists()
    for e in evals:
        assert set(e["eval"]) == {"ja", "en-replay"}
    assert evals[-1]["eval"]["ja"]["loss"] < evals[0]["eval"]["ja"]["loss"]  # training on ja helps held-out ja
    tags = {tag for f in (runs["evaluated"] / "tensorboard").iterdir() for tag in scalar_tags(f)}
    assert {"eval/ja/bits_per_byte", "eval/en-replay/loss", "train/loss"} <= tags
    assert (runs["evaluated"] / "loss.png").stat().st_size > 0

    # the final evaluation is what `rsdjax eval` says of the exported model
    capsys.readouterr()
    held = tmp_path / "held_out"
    assert main(["eval", "--model", str(runs["evaluated"] / "model"), f"ja={held / 'ja.txt'}",
                 f"en-replay={held / 'en.txt'}", "--seq-len", "32", "--batch-size", "4", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["sources"]
    for name in ("ja", "en-replay"):
        for k in ("loss", "bits_per_byte", "chars_per_token"):
            assert cli[name][k] == pytest.approx(evals[-1]["eval"][name][k], rel=1e-5), (name, k)


def test_eval_config_errors_are_one_line(tmp_path, tiny_tokenizer_dir):
    import dataclasses

    from rsdjax.config import ConfigError
    from rsdjax.train.config import train_config_from_dict

    cfg = config(tmp_path, tiny_tokenizer_dir, "bad", True)
    base = dataclasses.asdict(cfg)
    for change, message in ((("every", -1), "eval.every must be >= 0"), (("sources", []), "eval.sources is empty")):
        broken = {**base, "eval": {**base["eval"], change[0]: change[1]}}
        with pytest.raises(ConfigError, match=message):
            train_config_from_dict(broken)


def test_eval_in_lora_finetuning_matches_rsdjax_eval(tmp_path, tiny_hf_dir, tiny_tokenizer_dir, capsys):
    from rsdjax.cli import main
    from rsdjax.loading import load_model, save_model
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.sft.config import load_finetune_config
    from rsdjax.sft.finetune import finetune

    base = save_model(load_model(tiny_hf_dir), tmp_path / "base")
    text = tmp_path / "en.txt"
    text.write_text((ROOT / "data/corpus/en/05_rivers.txt").read_text(encoding="utf-8")[:300])
    qa = ROOT / "data/qa/eval.jsonl"
    cfg = load_finetune_config("lora-qa-demo", [
        f"base={base}", f"tokenizer={tiny_tokenizer_dir}", f"output={tmp_path / 'adapter'}", "steps=3",
        "optim.warmup_steps=1", "log_every=3", "data.seq_len=64", "demo_questions=[]", "data.eval=null",
        f"eval={{every: 2, sources: [{{name: qa, paths: [{qa}]}}, {{name: en, paths: [{text}]}}]}}"])
    finetune(cfg, make_mesh({"fsdp": 2, "tensor": 4}), log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "adapter" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 3]
    assert rows[-1]["eval"]["qa"]["loss"] < rows[0]["eval"]["qa"]["loss"]  # the adapter learns the Q&A format

    capsys.readouterr()
    assert main(["eval", "--model", str(base), "--tokenizer", str(tiny_tokenizer_dir), "--lora",
                 str(tmp_path / "adapter"), f"qa={qa}", f"en={text}", "--seq-len", "64", "--no-generate",
                 "--json", "--mesh", "fsdp=2,tensor=4"]) == 0
    cli = json.loads(capsys.readouterr().out)["sources"]
    for name in ("qa", "en"):
        for k in ("loss", "bits_per_byte"):
            assert cli[name][k] == pytest.approx(rows[-1]["eval"][name][k], rel=1e-5), (name, k)


def test_holdout_fraction_takes_files_out_of_training(tmp_path):
    from rsdjax.data.sources import DataError, expand_paths
    from rsdjax.eval.held_out import hold_out_files
    from rsdjax.train.config import SourceConfig

    sources = [SourceConfig("ja", [str(ROOT / "data/corpus/ja")], 0.9), SourceConfig("en", [str(ROOT / "data/corpus/en")])]
    train, held = hold_out_files(sources, 0.25)
    for src, t, h in zip(sources, train, held):
        everything = expand_paths(src.paths)
        assert t.name == h.name == src.name and t.weight == src.weight
        assert not set(t.paths) & set(h.paths) and sorted(t.paths + h.paths) == sorted(map(str, everything))
        assert len(h.paths) == len(everything) // 4
    single = tmp_path / "one.txt"
    single.write_text("only one file")
    with pytest.raises(DataError, match="eval.holdout=0.25 needs at least 2 files"):
        hold_out_files([SourceConfig("x", [str(single)])], 0.25)
