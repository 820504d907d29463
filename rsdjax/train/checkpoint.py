"""Training checkpoints: Orbax `CheckpointManager` plus a directory signature.

A checkpoint `<dir>/<step>/` holds two Orbax items written together:
  * `state`: {"params": saved variables, "opt_state": ..., "step": int32, "rng": uint32[2]}
  * `meta`:  JSON: data position (examples consumed), stage name, model architecture, config name.
Orbax writes each step into a temporary directory and renames it into place when every item is
complete (atomic on local and POSIX file systems), and deletes old steps (`keep`) only after a new
one is finalised. So a SIGKILL at any moment, also during a save, leaves the last complete
checkpoint intact; the next run removes the debris (`cleanup_tmp_directories`).

`<dir>/rsdjax_run.json` records the model architecture when the directory is first used. A run
of a different model pointed at the directory is refused before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import orbax.checkpoint as ocp

from rsdjax.checkpoint.errors import CheckpointError

RUN_FILE = "rsdjax_run.json"
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix for a step directory still being written
ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
             "head_dim", "tie_word_embeddings")


def architecture(model_cfg) -> dict:
    """The fields that decide parameter shapes (what must match to resume)."""
    return {k: getattr(model_cfg, k) for k in ARCH_KEYS}


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_directory(directory: Path, arch: dict) -> None:
    """Raise CheckpointError if `directory` holds checkpoints of another model or is not ours."""
    run_file = directory / RUN_FILE
    if run_file.exists():
        try:
            recorded = json.loads(run_file.read_text())["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{run_file}: unreadable run file ({e})") from None
        diff = [k for k in ARCH_KEYS if recorded.get(k) != arch.get(k)]
        if diff:
            k = diff[0]
            raise CheckpointError(f"{directory}: holds checkpoints of a different model ({k}={recorded.get(k)}, "
                                  f"this run has {k}={arch.get(k)}); use another checkpoint.dir or remove it")
    elif directory.exists() and any(not p.name.startswith(".") for p in directory.iterdir()):
        raise CheckpointError(f"{directory}: exists, is not empty and has no {RUN_FILE}; "
                              "it is not an rsdjax training checkpoint directory")


class TrainCheckpointer:
    """Save every `every` steps (and when asked), keep the last `keep`, restore the latest."""

    def __init__(self, directory: str | Path, arch: dict, *, every: int, keep: int, async_save: bool = True,
                 is_writer: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        check_directory(self.directory, arch)
        _barrier("rsdjax-checkpoint-dir-checked")  # every process has checked before anyone writes
        if is_writer and not (self.directory / RUN_FILE).exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{RUN_FILE}.tmp"
            tmp.write_text(json.dumps({"format": 1, "model": arch}, indent=2))
            os.replace(tmp, self.directory / RUN_FILE)
        if is_writer and self.directory.exists():
            # debris of a save that was killed: never a checkpoint (only renamed steps are); remove it now
            # rather than at the next save (Orbax's own cleanup_tmp_directories waits for that)
            for debris in self.directory.glob(f"*{TMP_MARK}*"):
                shutil.rmtree(debris, ignore_errors=True)
        _barrier("rsdjax-checkpoint-dir-ready")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, tree: dict, meta: dict, wait: bool = False) -> None:
        """Start writing step `step` (arrays are copied off the devices before this returns)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises assorted types for a damaged step
            raise CheckpointError(f"{self.directory}/{step}: cannot read checkpoint metadata ({_first_line(e)})") from None

    def restore(self, step: int, abstract_tree: dict) -> dict:
        """Restore `state` into the structure, dtypes and shardings of `abstract_tree`."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree)))
        except Exception as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore ({_first_line(e)})") from None
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_state(directory: str | Path, step: int | None = None) -> tuple[int, dict, dict]:
    """(step, state as numpy arrays, meta) of a checkpoint, on the host (for tests, export and inspection)."""
    import jax
    import numpy as np

    directory = Path(directory).absolute()
    with ocp.CheckpointManager(directory, item_names=("state", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: no complete checkpoint")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    with ocp.PyTreeCheckpointer() as ckptr:
        path = directory / str(step) / "state"
        tree = ckptr.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return step, state, meta
