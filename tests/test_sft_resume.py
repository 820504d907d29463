"""`rsdjax finetune` killed (SIGKILL) at two random moments and re-run with the same command ends
with the adapter and optimizer state bit-identical to an uninterrupted run; as one process and as two."""
import json
import os
import signal
import socket
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


def start(args, processes: int, log) -> list[subprocess.Popen]:
    """The command as one process, or as `processes` processes of one 8-device mesh (jax.distributed, gloo)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if processes == 1:
        return [subprocess.Popen([sys.executable, "-m", "rsdjax", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=log, env=env)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // processes}"
    return [subprocess.Popen([sys.executable, "-m", "rsdjax", *args, "--coordinator-address", f"127.0.0.1:{port}",
                              "--num-processes", str(processes), "--process-id", str(i)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env=env) for i in range(processes)]


def run(args, out, processes: int, kill_after_step: int | None = None, delay: float = 0.0) -> None:
    """Run the command to its end, or SIGKILL every process `delay` s after step `kill_after_step` was logged."""
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "a") as log:
        procs = start(args, processes, log)
        try:
            deadline = time.monotonic() + 300
            if kill_after_step is not None:
                while all(p.poll() is None for p in procs) and steps_logged(out) < kill_after_step \
                        and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(delay)
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGKILL)
            codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
        finally:  # one failed process leaves the other waiting at a barrier: do not leave it running
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    allowed = (0,) if kill_after_step is None else (0, -signal.SIGKILL)
    assert all(c in allowed for c in codes), (codes, log_path.read_text()[-3000:])


def assert_same_run(out, ref_out) -> None:
    ref_step, ref_state, _ = read_state(ref_out / "checkpoints")
    step, state, meta = read_state(out / "checkpoints")
    assert step == ref_step == STEPS and meta["data_position"] == STEPS
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    for (path, a), b in zip(jax.tree.leaves_with_path(state), jax.tree.leaves(ref_state), strict=True):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)  # adapter, Adam moments, step, RNG: the same bits
    assert (out / "adapter_model.safetensors").read_bytes() == (ref_out / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((ref_out / "adapter_config.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # redone steps replace their lines


def kill_twice_and_finish(args, out, processes: int) -> None:
    """Two kills at random moments (after a random step, plus a random fraction of a step), then the same
    command again completes the run. The second kill comes after a step the first run had not logged, so
    the resumed run is killed while it trains, not while it starts."""
    rng = np.random.default_rng(int(time.time()))
    run(args, out, processes, int(rng.integers(1, STEPS - 1)), float(rng.uniform(0, 0.5)))
    done = steps_logged(out)
    run(args, out, processes, int(rng.integers(min(done + 1, STEPS - 1), STEPS)), float(rng.uniform(0, 0.5)))
    run(args, out, processes)


@pytest.mark.slow
def test_lora_resume_after_sigkill_is_bit_identical(tmp_path, tiny_hf_dir, tiny_tokenizer_dir):
    base = save_model(load_model(tiny_hf_dir), tmp_path / "base")
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    assert main(command(base, tiny_tokenizer_dir, ref_out)) == 0
    kill_twice_and_finish(command(base, tiny_tokenizer_dir, out), out, processes=1)
    assert_same_run(out, ref_out)


@pytest.mark.slow
def test_two_process_lora_resume_after_sigkill_is_bit_identical(tmp_path, tiny_hf_dir, tiny_tokenizer_dir):
    """The same as two processes (2 x 4 CPU devices, one 8-device mesh): the reference is a two-process run
    too (gloo sums in another order than one process does, so only the same layout gives the same bits)."""
    base = save_model(load_model(tiny_hf_dir), tmp_path / "base")
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    run(command(base, tiny_tokenizer_dir, ref_out), ref_out, processes=2)
    kill_twice_and_finish(command(base, tiny_tokenizer_dir, out), out, processes=2)
    assert_same_run(out, ref_out)
