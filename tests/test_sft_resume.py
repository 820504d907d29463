"""`rsdjax finetune` killed (SIGKILL) at two random moments and re-run with the same command ends
with the adapter and optimizer state bit-identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
from rsdjax.cli import main
from rsdjax.loading import load_model, save_model
from rsdjax.train.checkpoint import read_state

STEPS = 6


def command(base, tokenizer, out) -> list[str]:
    return ["finetune", "lora-qa-demo", f"base={base}", f"tokenizer={tokenizer}", f"output={out}",
            f"steps={STEPS}", "batch_size=4", "optim.warmup_steps=2", "data.seq_len=64", "data.eval=null",
            "lora.r=4", "lora.dropout=0.1", "checkpoint.every=1", "log_every=1", "demo_questions=[]"]


def steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def run_and_kill(args, out, kill_after_step: int, delay: float) -> None:
    """Start the command, SIGKILL it `delay` s after it logged step `kill_after_step` (or when it ends)."""
    proc = subprocess.Popen([sys.executable, "-m", "rsdjax", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while proc.poll() is None and steps_logged(out) < kill_after_step and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]


@pytest.mark.slow
def test_lora_resume_after_sigkill_is_bit_identical(tmp_path, tiny_hf_dir, tiny_tokenizer_dir):
    base = save_model(load_model(tiny_hf_dir), tmp_path / "base")
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    assert main(command(base, tiny_tokenizer_dir, ref_out)) == 0

    rng = np.random.default_rng(int(time.time()))
    for _ in range(2):  # two kills at random moments: after a random step, plus a random fraction of a step
        run_and_kill(command(base, tiny_tokenizer_dir, out), out, int(rng.integers(1, STEPS)), float(rng.uniform(0, 0.5)))
    assert main(command(base, tiny_tokenizer_dir, out)) == 0  # the same command again completes the run

    ref_step, ref_state, _ = read_state(ref_out / "checkpoints")
    step, state, meta = read_state(out / "checkpoints")
    assert step == ref_step == STEPS and meta["data_position"] == STEPS
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        assert np.array_equal(a, b)  # adapter, Adam moments, step, RNG: the same bits
    assert (out / "adapter_model.safetensors").read_bytes() == (ref_out / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((ref_out / "adapter_config.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # redone steps replace their lines
