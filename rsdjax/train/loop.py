"""The continual pre-training loop: checks, resume, steps, checkpoints, signals, export.

Running the same command again resumes from the latest complete checkpoint: parameters,
optimizer state, step, data position and RNG come back exactly, so an interrupted run ends with
the same bits as an uninterrupted one. Every check on the user's input (mesh vs batch, tokenizer,
model vs checkpoint directory, corpus) runs before the checkpoint directory is touched.
"""
from __future__ import annotations

import dataclasses
import shutil
import signal
import threading
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from rsdjax.checkpoint.durable import replace_dir
from rsdjax.config import ConfigError
from rsdjax.data.pipeline import build_mixture, global_batch
from rsdjax.data.sources import expand_paths
from rsdjax.train.checkpoint import TrainCheckpointer, architecture, check_directory
from rsdjax.train.config import TrainConfig
from rsdjax.train.metrics import LOSS_PNG, MetricsLogger, flops_per_token, plot_loss
from rsdjax.train.optimizer import make_optimizer
from rsdjax.train.setup import final_model_config, initial_model, peak_flops, prepare_tokenizers, stderr_log
from rsdjax.train.step import EMBEDDINGS, TrainState, TrainStep, check_batch

STAGE_FILTERS = {"all": nnx.Param, "embeddings": EMBEDDINGS}


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int  # updates done (== cfg.steps when finished)
    finished: bool
    stopped_by: str | None  # "SIGTERM" / "SIGINT" when a signal stopped the run
    first_loss: float | None
    last_loss: float | None
    model_dir: Path | None  # the exported final model (rsdjax checkpoint + tokenizer)


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves at the end of the step and exits. A second SIGINT aborts."""

    def __init__(self):
        self.name: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """True on every process if any process was signalled (so all save the same step)."""
        local = self.name is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def join_params(trainable: dict, frozen: dict) -> dict:
    return unflatten_dict({**flatten_dict(frozen), **flatten_dict(trainable)})


def split_params(full: dict, step: TrainStep) -> tuple[dict, dict]:
    flat = flatten_dict(full)
    keys = set(flatten_dict(step.param_shardings))
    pick = lambda want: unflatten_dict({k: v for k, v in flat.items() if (k in keys) == want})
    return pick(True), pick(False)


class Stages:
    """One TrainStep per stage, built on first use (each compiles once)."""

    def __init__(self, cfg: TrainConfig, model, mesh, new_rows_from: int | None = None):
        """`new_rows_from`: the first new token's row when the vocabulary grew (for embedding_rows: new)."""
        self.cfg, self.model, self.mesh, self._built = cfg, model, mesh, {}
        if cfg.embedding_steps and cfg.embedding_rows == "new" and new_rows_from is None:
            raise ConfigError(f"train config '{cfg.name}': embedding_rows: new needs a vocabulary that grows "
                              "(tokenizer.base with fewer tokens than tokenizer.path)")
        self.new_rows_from = new_rows_from

    def at(self, step: int) -> tuple[str, int, int]:
        for stage in self.cfg.stages:
            if stage[1] <= step < stage[2]:
                return stage
        return self.cfg.stages[-1]

    def step_fn(self, name: str) -> TrainStep:
        if name not in self._built:
            # a checkpoint from a stage this config no longer has still restores (its optimizer state is dropped)
            _, start, end = next((s for s in self.cfg.stages if s[0] == name), (name, 0, self.cfg.steps))
            optim, first_row = self.cfg.optim, None
            if name == "embeddings":
                optim = dataclasses.replace(optim, lr=self.cfg.embedding_lr or optim.lr)
                first_row = self.new_rows_from if self.cfg.embedding_rows == "new" else None
            tx, schedule = make_optimizer(optim, end - start, first_row)
            self._built[name] = TrainStep(self.model, tx, self.mesh, trainable=STAGE_FILTERS[name],
                                          grad_accum=self.cfg.grad_accum, schedule=schedule, stage_start=start)
        return self._built[name]

    def abstract_full_params(self, name: str) -> dict:
        ts = self.step_fn(name)
        return join_params(ts.abstract_state.params, ts.abstract_frozen)


def train(cfg: TrainConfig, mesh, log=stderr_log) -> TrainResult:
    from rsdjax.loading import abstract_model

    from rsdjax.hardware import format_mesh
    from rsdjax.parallel.mesh import mesh_shape_of

    run_dir = Path(cfg.run_dir)
    n = jax.process_count()
    log(f"{cfg.name}: mesh {format_mesh(mesh_shape_of(mesh))} over {jax.device_count()} devices in {n} "
        f"process{'es' if n > 1 else ''}")
    check_batch(cfg.batch_size, cfg.grad_accum, mesh)
    train_sources, held_sources = cfg.data.sources, []
    if cfg.eval is not None and cfg.eval.holdout > 0:
        from rsdjax.eval.held_out import hold_out_files

        train_sources, held_sources = hold_out_files(cfg.data.sources, cfg.eval.holdout)
    held_files = [p for s in [*held_sources, *(cfg.eval.sources if cfg.eval else [])] for p in expand_paths(s.paths)]
    tok, base_tok = prepare_tokenizers(cfg, log, held_out=held_files)
    model_cfg = final_model_config(cfg, tok, base_tok)
    check_directory(cfg.checkpoint_dir.absolute(), architecture(model_cfg))
    mixture = build_mixture(train_sources, tok, cfg.data.seq_len, cfg.cache_dir, cfg.seed)
    for s in mixture.info():
        log(f"data source '{s.name}': {s.num_docs} documents, {s.num_tokens:,} tokens, {s.num_windows} windows "
            f"of {cfg.data.seq_len}, weight {s.weight:.2f}")
    held_out = make_held_out(cfg, tok, model_cfg, mesh, log, held_sources)  # (checked before anything is written)

    ckpt = TrainCheckpointer(cfg.checkpoint_dir, architecture(model_cfg), every=cfg.checkpoint.every,
                             keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                             is_writer=jax.process_index() == 0)
    grew = base_tok is not None and tok.vocab_size > base_tok.vocab_size
    stages = Stages(cfg, abstract_model(model_cfg), mesh, base_tok.vocab_size if grew else None)
    latest = ckpt.latest_step()
    if latest is None:
        name = stages.at(0)[0]
        ts = stages.step_fn(name)
        params, frozen = ts.split(initial_model(cfg, mesh, tok, base_tok, log))
        state = ts.init(params, step=0, seed=cfg.seed)
        data_pos = 0
    else:
        meta = ckpt.read_meta(latest)
        check_resumable(meta, cfg, f"{ckpt.directory}/{latest}")
        saved = stages.step_fn(meta["stage"])
        abstract = {"params": stages.abstract_full_params(meta["stage"]), "opt_state": saved.abstract_state.opt_state,
                    "step": saved.abstract_state.step, "rng": saved.abstract_state.rng}
        tree = ckpt.restore(latest, abstract)
        name = stages.at(latest)[0]
        ts = stages.step_fn(name)
        params, frozen = split_params(tree["params"], ts)
        if name == meta["stage"]:
            state = TrainState(tree["step"], params, tree["opt_state"], tree["rng"])
        else:  # resumed exactly at a stage boundary: the next stage starts with a fresh optimizer
            state = dataclasses.replace(ts.init(params, step=latest), rng=tree["rng"])
        data_pos = int(meta["data_position"])
        log(f"resumed from {ckpt.directory}/{latest} (stage '{meta['stage']}', data position {data_pos})")

    step = latest or 0
    metrics = MetricsLogger(run_dir, cfg.steps, step, tokens_per_step=cfg.batch_size * cfg.data.seq_len,
                            flops_per_token=flops_per_token(model_cfg, cfg.data.seq_len),
                            peak_flops=peak_flops(cfg, mesh), enabled=jax.process_index() == 0,
                            tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, print_every=cfg.log.every)
    shardings = {k: ts.batch_sharding for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}

    def evaluate(step: int, fresh_start: bool = False) -> None:
        if held_out is not None and held_out.due(step, fresh_start):
            metrics.log_eval(step, lambda: held_out.run(join_params(state.params, frozen)))

    stopped_by = None
    try:
        with StopSignal() as stop:
            if latest is None:  # a resumed step was evaluated before its checkpoint was written
                evaluate(0, fresh_start=True)
            metrics.start_clock()
            while step < cfg.steps:
                stage_name = stages.at(step)[0]
                if stage_name != name:  # entering the next stage: new trainable set, fresh optimizer
                    ts_next = stages.step_fn(stage_name)
                    params, frozen = split_params(join_params(state.params, frozen), ts_next)
                    state = dataclasses.replace(ts_next.init(params, step=step), rng=state.rng)
                    name, ts = stage_name, ts_next
                    log(f"step {step}: stage '{name}' (training {'all parameters' if name == 'all' else name})")
                batch = global_batch(mixture, data_pos, cfg.batch_size, shardings)
                state, m = ts(state, frozen, batch)
                step += 1
                data_pos += cfg.batch_size
                # logs the previous step (no host wait for this one: the next batch loads while it runs)
                metrics.log_after_next(step, m, {"stage": name})
                evaluate(step)
                interrupted = stop.agreed()
                if ckpt.due(step) or step == cfg.steps or interrupted:
                    metrics.flush()  # every saved step has its metrics line (resume cuts later ones)
                    tree = {"params": join_params(state.params, frozen), "opt_state": state.opt_state,
                            "step": state.step, "rng": state.rng}
                    meta = {"data_position": data_pos, "stage": name, "model": architecture(model_cfg),
                            "config": cfg.name, "batch_size": cfg.batch_size, "seq_len": cfg.data.seq_len}
                    ckpt.save(step, tree, meta, wait=interrupted)
                if interrupted:
                    stopped_by = stop.name or "signal"
                    log(f"{stopped_by}: saved step {step} to {ckpt.directory}; run the same command to resume")
                    break
    finally:
        metrics.close()
        ckpt.close()

    finished = step >= cfg.steps
    model_dir = None
    if finished:
        model_dir = export(cfg, stages.step_fn(name).merge(state.params, frozen), tok, log)
        if jax.process_index() == 0 and metrics.path.exists():
            plot_loss(metrics.path, run_dir / LOSS_PNG, title=f"{cfg.name}: training loss")
            log(f"loss curve: {run_dir / LOSS_PNG}")
    losses = [row["loss"] for row in metrics.rows]
    return TrainResult(run_dir, step, finished, stopped_by, losses[0] if losses else None,
                       losses[-1] if losses else None, model_dir)


def make_held_out(cfg: TrainConfig, tok, model_cfg, mesh, log, held_sources=()):
    """The held-out evaluator of `cfg.eval` (None without one); reads its files before training starts."""
    if cfg.eval is None:
        return None
    from rsdjax.eval.held_out import HeldOut
    from rsdjax.loading import abstract_model

    held_out = HeldOut(cfg.eval, tok, abstract_model(model_cfg), mesh, seq_len=cfg.eval.seq_len or cfg.data.seq_len,
                       batch_size=cfg.eval.batch_size or cfg.batch_size // cfg.grad_accum, total_steps=cfg.steps,
                       extra_sources=held_sources)
    for name, _, stats in held_out.sources:
        log(f"eval source '{name}': {stats.documents} documents, {stats.tokens:,} tokens")
    return held_out


def check_resumable(meta: dict, cfg: TrainConfig, where: str) -> None:
    """The data position counts examples of `seq_len` tokens, `batch_size` per step: resuming with
    others would silently train on a different stream than the one the checkpoint continues."""
    for key, now in (("batch_size", cfg.batch_size), ("seq_len", cfg.data.seq_len)):
        if key in meta and int(meta[key]) != now:
            name = "data.seq_len" if key == "seq_len" else key
            raise ConfigError(f"{where}: saved with {name}={meta[key]}, this run has {name}={now}; resume with "
                              f"{name}={meta[key]}, or start a new run in another run_dir")


def export(cfg: TrainConfig, model, tok, log) -> Path | None:
    """The final model as an rsdjax checkpoint (plus tokenizer, and HF format if asked)."""
    from rsdjax.checkpoint.hf import save_hf
    from rsdjax.loading import save_model

    if jax.process_count() > 1:
        log("multi-process run: the final model is the last checkpoint (export it from one process)")
        return None
    out = Path(cfg.run_dir) / "model"
    if not (out / "rsdjax_model.json").exists():
        save_model(model, out)
    tok.save(out)  # (again, in case an earlier export was killed between the two)
    log(f"final model: {out}")
    if cfg.export_hf:
        hf_dir = Path(cfg.run_dir) / "hf"
        staging = hf_dir.with_name("hf.new")  # the previous export stays until this one is complete
        shutil.rmtree(staging, ignore_errors=True)
        save_hf(model, staging, tokenizer_dir=out)
        replace_dir(staging, hf_dir)
        log(f"final model (HF format): {hf_dir}")
    return out
