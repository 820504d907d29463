"""The training loop end to end: bad input, SIGTERM/SIGKILL and resume, kill during a save, 2 processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, tree_digest as digest
from rsdjax.cli import main
from rsdjax.serve.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
STEPS = 9


def write_config(path: Path, tokenizer_dir, **changes) -> Path:
    """A small run: 1-layer tiny Llama, 8 x 32 windows, an embeddings-only first stage, fsdp=2 x tensor=4."""
    cfg = {
        "name": "loop-test", "run_dir": str(path / "run"),
        "model": {"preset": "tiny", "num_layers": 1},
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"seq_len": 32, "sources": [{"name": "ja", "paths": [str(ROOT / "data/corpus/ja")], "weight": 0.8},
                                             {"name": "en", "paths": [str(ROOT / "data/corpus/en")], "weight": 0.2}]},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "steps": STEPS, "embedding_steps": 2, "batch_size": 8, "grad_accum": 2,
        "mesh": "fsdp=2,tensor=4", "checkpoint": {"every": 3, "keep": 2}, "log": {"every": 1, "tensorboard": True},
    }
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return path / "cfg.yaml"


def launch(cfg: Path, *args, devices=8, log=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, str(ROOT / "scripts/train_cpt.py"), str(cfg), *args], cwd=ROOT, env=env,
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return out


def wait_for(cond, proc, timeout=300.0, poll=0.002):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("condition not reached")


# ---------------------------------------------------------------- bad input


@pytest.fixture()
def existing_checkpoint(tmp_path, tiny_tokenizer_dir):
    """A real checkpoint directory of the 1-layer run (written by the checkpointer, no training needed)."""
    import jax.numpy as jnp

    from rsdjax.config import load_model_config
    from rsdjax.train.checkpoint import TrainCheckpointer, architecture

    cfg = load_model_config("tiny", ["num_layers=1"])
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ck = TrainCheckpointer(ckpt_dir, architecture(cfg), every=1, keep=2, async_save=False)
    ck.save(3, {"params": {"embed": jnp.ones((4, 4))}, "step": jnp.int32(3)},
            {"data_position": 24, "stage": "all", "batch_size": 8, "seq_len": 32})  # what the loop records
    ck.close()
    return ckpt_dir


@pytest.mark.parametrize("case", ["other_model", "empty_corpus", "tiny_corpus", "batch_vs_mesh", "changed_batch",
                                  "changed_seq_len"])
def test_bad_input_is_one_line_and_leaves_checkpoints_alone(case, tmp_path, tiny_tokenizer_dir, existing_checkpoint,
                                                            capsys):
    changes, expect = {
        "other_model": ({"model.num_layers": 2}, "holds checkpoints of a different model (num_layers=1, this run has num_layers=2)"),
        "empty_corpus": ({"data.sources": [{"name": "empty", "paths": [str(tmp_path / "empty")]}]}, "corpus is empty"),
        "tiny_corpus": ({"data.sources": [{"name": "tiny", "paths": [str(tmp_path / "tiny.txt")]}]},
                        "fewer than one window of seq_len + 1 = 33"),
        "batch_vs_mesh": ({"batch_size": 6, "grad_accum": 1, "mesh": "fsdp=4,tensor=2"},
                          "batch_size=6 with grad_accum=1 gives micro-batches of 6 rows, not divisible"),
        "changed_batch": ({"batch_size": 4, "grad_accum": 1}, "/3: saved with batch_size=8, this run has batch_size=4"),
        "changed_seq_len": ({"data.seq_len": 16}, "saved with data.seq_len=32, this run has data.seq_len=16"),
    }[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    (tmp_path / "tiny.txt").write_text("ab")
    cfg = write_config(tmp_path, tiny_tokenizer_dir, **changes)
    before = digest(existing_checkpoint)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("rsdjax train: error: ") and expect in errors[0], err
    assert "Traceback" not in err
    assert digest(existing_checkpoint) == before


def test_configs_in_repo_validate():
    from rsdjax.train.config import load_train_config

    demo = load_train_config("cpt-demo")
    assert demo.stages == [("embeddings", 0, 20), ("all", 20, 160)]
    big = load_train_config("cpt-tedllm-8b")
    assert big.model.vocab_size == 141056 and big.data.seq_len == 8192 and big.model.num_layers == 32


def test_exponent_numbers_are_numbers_in_yaml_and_overrides(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` without a dot as a string; a float key takes it as the number."""
    from rsdjax.config import ConfigError
    from rsdjax.train.config import load_train_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text((ROOT / "configs" / "train" / "cpt-demo.yaml").read_text().replace("lr: 3.0e-3", "lr: 3e-3"))
    assert load_train_config(str(cfg_file)).optim.lr == 3e-3
    assert load_train_config("cpt-demo", ["optim.lr=1e-2"]).optim.lr == 0.01
    for text in ("fast", "nan", "inf"):  # float() would take the last two as numbers
        with pytest.raises(ConfigError, match=f"optim.lr: expected a number, got '{text}'"):
            load_train_config("cpt-demo", [f"optim.lr={text}"])


def test_tedllm_8b_dry_run(capsys):
    """The full-size config shards and lowers on 8 virtual CPU devices without allocating it."""
    from rsdjax.train.config import load_train_config

    cfg = load_train_config("cpt-tedllm-8b")
    assert main(["train", "cpt-tedllm-8b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{cfg.model.num_params() / 1e9:.2f} B parameters, vocab 141056" in out
    assert out.count("step lowered OK") == 2 and "fsdp=8" in out
    # stage 1 keeps Adam moments for the embedding and head only: 2 x 2 x 141056 x 4096 x 4 bytes / 8 devices
    assert f"{2 * 2 * 141056 * 4096 * 4 / 8 / 1e9:.2f} GB optimizer" in out


# ---------------------------------------------------------------- kill -9 during a save


SAVER = """
import sys, jax.numpy as jnp
from rsdjax.train.checkpoint import TrainCheckpointer
ck = TrainCheckpointer(sys.argv[1], {"hidden_size": 1}, every=1, keep=1, async_save=True)
ck.save(1, {"x": jnp.arange(10.0)}, {"data_position": 1}, wait=True)
print("saved 1", flush=True)
ck.save(2, {"x": jnp.ones(96 * 1024 * 1024, jnp.float32)}, {"data_position": 2})  # ~400 MB: a slow write
print("saving 2", flush=True)
ck.wait()
print("saved 2", flush=True)
"""


def test_sigkill_during_a_save_keeps_the_last_complete_checkpoint(tmp_path):
    from rsdjax.train.checkpoint import TrainCheckpointer, read_state

    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(ckpt_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "saved 1"
    assert proc.stdout.readline().strip() == "saving 2"
    assert wait_for(lambda: any("tmp" in p.name for p in ckpt_dir.iterdir()), proc, timeout=60, poll=0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt_dir / "2").exists()  # killed mid-write: step 2 never became a checkpoint
    assert any("tmp" in p.name for p in ckpt_dir.iterdir())
    step, state, meta = read_state(ckpt_dir)
    assert step == 1 and meta == {"data_position": 1} and np.array_equal(state["x"], np.arange(10.0))
    ck = TrainCheckpointer(ckpt_dir, {"hidden_size": 1}, every=1, keep=1)  # a new run cleans the debris
    assert ck.latest_step() == 1
    ck.close()
    assert not any("tmp" in p.name for p in ckpt_dir.iterdir())


# ---------------------------------------------------------------- SIGTERM, SIGKILL, resume: bit-identical


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(tmp_path, tiny_tokenizer_dir):
    """A SIGTERM, then 5 SIGKILLs at random moments (while JAX starts, mid-step, during saves), then
    a run to the end: bit-identical to an uninterrupted run."""
    import random

    from rsdjax.train.checkpoint import read_state

    # the reference run first: it fills the session's compile cache (conftest), so the seven
    # launches after it start in seconds, running the same compiled code
    ref = launch(write_config(tmp_path / "ref", tiny_tokenizer_dir), log=open(tmp_path / "ref.log", "w"))
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    cfg = write_config(tmp_path / "int", tiny_tokenizer_dir)
    run_dir, ckpt_dir = tmp_path / "int" / "run", tmp_path / "int" / "run" / "checkpoints"
    log = open(tmp_path / "int.log", "a")

    # 1. SIGTERM after the first stage: the run saves where it is and exits 128 + 15
    proc = launch(cfg, log=log)
    assert wait_for(lambda: len(logged_steps(run_dir)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, (tmp_path / "int.log").read_text()[-2000:]
    stopped_at = max(logged_steps(run_dir))
    assert read_state(ckpt_dir)[0] == stopped_at and stopped_at < STEPS

    # 2. five SIGKILLs, each at a random moment of a resumed run; the last complete checkpoint survives each
    rng, survivor = random.Random(16), stopped_at
    for moment in ("starting", "saving", "mid-step", "saving", "starting"):
        proc = launch(cfg, log=log)
        if moment == "starting":  # JAX importing, compiling or restoring
            time.sleep(rng.uniform(0.5, 6.0))
            caught = proc.poll() is None
        elif moment == "saving":  # a later checkpoint being written
            caught = wait_for(lambda: any("tmp" in p.name for p in ckpt_dir.iterdir())
                              and max(logged_steps(run_dir)) > survivor, proc, poll=0.0005)
        else:  # after a random number of steps past the checkpoint it resumed from
            target = survivor + rng.randint(1, STEPS - 1 - survivor)
            caught = wait_for(lambda: max(logged_steps(run_dir)) >= target, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert caught, f"the run ended before the SIGKILL {moment}"
        step = read_state(ckpt_dir)[0]  # intact and readable
        assert survivor <= step < STEPS, moment
        survivor = step

    # 3. same command again: runs to the end
    proc = launch(cfg, log=log)
    assert proc.wait(timeout=600) == 0, (tmp_path / "int.log").read_text()[-3000:]

    step_a, a, meta_a = read_state(tmp_path / "ref" / "run" / "checkpoints")
    step_b, b, meta_b = read_state(ckpt_dir)
    assert step_a == step_b == STEPS and meta_a == meta_b
    import jax

    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(x, y), jax.tree_util.keystr(path)  # bit for bit: params, Adam moments, RNG
    # each step logged once, with the same losses as the uninterrupted run
    rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    ref_rows, int_rows = rows(tmp_path / "ref" / "run"), rows(run_dir)
    assert [r["step"] for r in int_rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in int_rows] == [r["loss"] for r in ref_rows]
    assert (run_dir / "loss.png").stat().st_size > 0 and list((run_dir / "tensorboard").iterdir())
    assert (run_dir / "model" / "rsdjax_model.json").exists() and (run_dir / "model" / "tokenizer.json").exists()


# ---------------------------------------------------------------- two processes = one 8-device mesh


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tiny_tokenizer_dir):
    from rsdjax.train.checkpoint import read_state

    one_cfg = write_config(tmp_path / "one", tiny_tokenizer_dir, steps=4, embedding_steps=0)
    two_cfg = write_config(tmp_path / "two", tiny_tokenizer_dir, steps=4, embedding_steps=0)
    one = launch(one_cfg, log=open(tmp_path / "one.log", "w"))
    port = free_port()
    procs = [launch(two_cfg, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                    "--process-id", str(i), devices=4, log=open(tmp_path / f"two{i}.log", "w")) for i in range(2)]
    try:
        for i, p in enumerate(procs):
            assert p.wait(timeout=600) == 0, (tmp_path / f"two{i}.log").read_text()[-3000:]
        assert one.wait(timeout=600) == 0, (tmp_path / "one.log").read_text()[-3000:]
    finally:  # one failed process leaves the other waiting at a barrier: do not leave it running
        for p in (*procs, one):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "2 processes" in (tmp_path / "two0.log").read_text()

    _, a, _ = read_state(tmp_path / "one" / "run" / "checkpoints")
    _, b, _ = read_state(tmp_path / "two" / "run" / "checkpoints")
    for name in a["params"]:
        # gloo all-reduces sum in another order than one process does; Adam turns an entry's float noise into
        # at most ~lr, so: all within 1e-4 and (almost) all within 1e-6
        diff = np.abs(b["params"][name] - a["params"][name])
        assert diff.max() < 1e-4 and np.mean(diff < 1e-6) > 0.999, (name, diff.max())
    loss = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(loss(tmp_path / "two" / "run"), loss(tmp_path / "one" / "run"), rtol=1e-5)


def test_init_from_hf_grows_the_vocabulary_with_documented_rows(tmp_path, tiny_hf_dir, tiny_tokenizer_dir):
    """Continual pre-training's starting point: HF weights, extended tokenizer, resized embedding and head."""
    from safetensors.numpy import load_file

    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.tokenizer import Tokenizer
    from rsdjax.train.config import load_train_config
    from rsdjax.train.setup import final_model_config, initial_model
    from rsdjax.model.resize import new_token_pieces
    from rsdjax.vocab import extend_tokenizer, read_texts

    base = Tokenizer.load(tiny_tokenizer_dir)
    extend_tokenizer(base, read_texts([ROOT / "data/corpus/ja"]), 64).save(tmp_path / "ext")
    cfg = load_train_config(write_config(tmp_path, tiny_tokenizer_dir), [
        f"init_from={tiny_hf_dir}", f"tokenizer.path={tmp_path / 'ext'}", f"tokenizer.base={tiny_tokenizer_dir}"])
    tok = Tokenizer.load(tmp_path / "ext")
    assert final_model_config(cfg, tok, base).vocab_size == 640  # 576 tokens, padded to a multiple of 128
    model = initial_model(cfg, make_mesh({"fsdp": 2, "tensor": 4}), tok, base, log=lambda m: None)
    hf = {}
    for f in tiny_hf_dir.glob("*.safetensors"):
        hf.update(load_file(f))
    embed, ref = np.asarray(model.embed[...]), hf["model.embed_tokens.weight"]
    assert embed.shape == (640, 128) and np.array_equal(embed[:512], ref)
    for new_id, pieces in list(new_token_pieces(base, tok).items())[:16]:
        np.testing.assert_allclose(embed[new_id], ref[pieces].mean(0), atol=1e-6)
    np.testing.assert_allclose(embed[600], ref.mean(0), atol=1e-6)  # padding row
    np.testing.assert_array_equal(np.asarray(model.wq[...])[0].reshape(128, -1), hf["model.layers.0.self_attn.q_proj.weight"].T)


def test_metrics_logged_one_step_late_are_each_logged_once_in_order(tmp_path):
    from rsdjax.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, total_steps=5, start_step=0, tokens_per_step=8, flops_per_token=1.0,
                           peak_flops=None, tensorboard=False, progress=False)
    logger.start_clock()
    values = lambda s: {"loss": np.float32(10 - s), "lr": 1e-3, "grad_norm": 1.0, "tokens": 8}
    returned = [logger.log_after_next(1, values(1))]
    assert returned == [None] and not (tmp_path / "metrics.jsonl").read_text()  # step 1 waits for step 2
    returned += [logger.log_after_next(s, values(s)) for s in (2, 3)]
    returned.append(logger.flush())  # before a checkpoint of step 3
    assert logger.flush() is None
    returned.append(logger.log_after_next(4, values(4)))
    logged = lambda: [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seen = []

    def run_eval():
        seen.append(logged())
        return {"ja": {"loss": 1.0, "perplexity": 2.7, "bits_per_byte": 0.5}}

    assert logger.log_eval(4, run_eval) == run_eval()
    assert seen[0] == [1, 2, 3, 4]  # step 4's line is written before its evaluation runs
    returned += [logger.log_after_next(5, values(5)), logger.flush()]
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and [r["loss"] for r in rows] == [9, 8, 7, 6, 5]
    assert [r and r["step"] for r in returned] == [None, 1, 2, 3, None, None, 5]
    assert logger.rows == rows  # what the loops report (first and last loss, the LoRA history)
    assert [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == [4]


def test_step_times_end_when_each_step_finished_and_leave_evaluations_out(tmp_path, monkeypatch):
    """A step already finished when handed to the logger ends then, not when its values are read after
    the next one was dispatched; one still running ends when its values arrive; an evaluation logged
    with a step counts in neither its time nor the next step's."""
    from rsdjax.train import metrics as metrics_module

    clock = [0.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: clock[0])

    class Running:  # a device value not ready at dispatch: reading it waits until t = `arrives`
        def __init__(self, arrives):
            self.arrives = arrives

        def is_ready(self):
            return False

        def __float__(self):
            clock[0] = max(clock[0], self.arrives)
            return 1.0

    def at(t, step, loss=1.0):
        clock[0] = t
        return logger.log_after_next(step, {"loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens": 8})

    def evaluate():
        clock[0] += 10.0
        return {"eval_loss": 0.5}

    logger = metrics_module.MetricsLogger(tmp_path, total_steps=5, start_step=0, tokens_per_step=8,
                                          flops_per_token=1.0, peak_flops=None, tensorboard=False, progress=False)
    logger.start_clock()
    at(2.0, 1)
    at(4.0, 2)
    assert logger.flush(late=evaluate)["eval_loss"] == 0.5  # step 2 and its evaluation, t = 4 -> 14
    at(16.0, 3)
    at(17.0, 4, loss=Running(20.0))
    at(18.0, 5, loss=Running(23.0))  # logs step 4: its value arrives at t = 20
    logger.flush()
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step_s"] for r in rows] == [2.0, 2.0, 2.0, 4.0, 3.0]
    assert [r.get("eval_loss") for r in rows] == [None, 0.5, None, None, None]
