"""Everything a run needs before its first step: tokenizer, final model config, initial model.

The model a run trains is the init model (an HF/rsdjax checkpoint, or a random model of
`cfg.model`) with its vocabulary grown to the run's tokenizer when `tokenizer.base` (the init
model's tokenizer) differs from `tokenizer.path`. `final_model_config` computes that config
without touching weights, so a resumed run never reloads the init model.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
from flax import nnx

from rsdjax.config import ConfigError, ModelConfig
from rsdjax.tokenizer import Tokenizer
from rsdjax.train.config import TrainConfig
from rsdjax.model.resize import round_up
from rsdjax.vocab import VocabError, chars_per_token, extend_tokenizer, read_texts, train_tokenizer

RUNTIME_FIELDS = ("param_dtype", "dtype", "remat")  # taken from the train config even with init_from


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and (Path(path) / "tokenizer.json").exists()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def prepare_tokenizers(cfg: TrainConfig, log=print, held_out=()) -> tuple[Tokenizer, Tokenizer | None]:
    """(the run's tokenizer, the init model's tokenizer or None), building them if configured.

    `held_out`: evaluation files; a tokenizer built here never learns from them (the held-out
    characters per token would otherwise flatter the extension)."""
    t = cfg.tokenizer

    if not _has_tokenizer(t.path) and jax.process_index() == 0:
        if t.build is None:
            raise ConfigError(f"tokenizer.path={t.path} has no tokenizer.json and tokenizer.build is not set")
        if not t.base:
            raise ConfigError("tokenizer.build needs tokenizer.base (the base tokenizer's directory)")
        if not _has_tokenizer(t.base):
            if not t.build.base_corpus:
                raise ConfigError(f"tokenizer.base={t.base} has no tokenizer.json and tokenizer.build.base_corpus is empty")
            base = train_tokenizer(read_texts(t.build.base_corpus, held_out), t.build.base_vocab_size)
            base.save(t.base)
            log(f"trained base tokenizer: {base.vocab_size} tokens -> {t.base}")
        base = Tokenizer.load(t.base)
        texts = read_texts(t.build.extend_corpus, held_out)
        ext = extend_tokenizer(base, texts, t.build.add)
        ext.save(t.path)
        log(f"extended tokenizer {base.vocab_size} -> {ext.vocab_size} tokens -> {t.path}; characters per token on "
            f"the extension corpus {chars_per_token(base, texts):.2f} -> {chars_per_token(ext, texts):.2f}")
    _barrier("rsdjax-tokenizer")
    tok = Tokenizer.load(t.path)
    base = Tokenizer.load(t.base) if t.base else None
    return tok, base


def init_model_config(cfg: TrainConfig, base_tok: Tokenizer | None, tok: Tokenizer) -> ModelConfig:
    """The architecture the run starts from (before any vocabulary growth)."""
    if cfg.init_from:
        from rsdjax.loading import read_model_config

        loaded = read_model_config(cfg.init_from)
        return dataclasses.replace(loaded, **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS})
    start_tok = base_tok or tok
    return dataclasses.replace(cfg.model, vocab_size=round_up(start_tok.vocab_size, cfg.vocab_multiple))


def final_model_config(cfg: TrainConfig, tok: Tokenizer, base_tok: Tokenizer | None) -> ModelConfig:
    start = init_model_config(cfg, base_tok, tok)
    grows = base_tok is not None and tok.vocab_size != base_tok.vocab_size
    vocab = max(round_up(tok.vocab_size, cfg.vocab_multiple), start.vocab_size) if grows else start.vocab_size
    if vocab < tok.vocab_size:
        raise VocabError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocab_size is {vocab}; "
                         "set tokenizer.base to the model's tokenizer so the vocabulary is resized")
    return dataclasses.replace(start, vocab_size=vocab).validate()


def initial_model(cfg: TrainConfig, mesh, tok: Tokenizer, base_tok: Tokenizer | None, log=print) -> nnx.Module:
    """The concrete, sharded model at step 0 (init model, vocabulary grown if needed)."""
    from rsdjax.loading import abstract_model, load_model
    from rsdjax.model.llama import Llama
    from rsdjax.parallel.sharding import create_sharded, state_shardings
    from rsdjax.model.resize import resize_vocab

    start = init_model_config(cfg, base_tok, tok)
    if cfg.init_from:
        model = load_model(cfg.init_from, mesh=mesh, rules="train",
                           overrides=[f"{k}={getattr(cfg.model, k)}" for k in RUNTIME_FIELDS])
        log(f"loaded init model {cfg.init_from} ({start.num_params() / 1e6:.1f} M parameters)")
    else:
        model = create_sharded(lambda: Llama(start, rngs=nnx.Rngs(cfg.seed)), mesh, "train")
        log(f"random init model {start.name} ({start.num_params() / 1e6:.1f} M parameters, seed {cfg.seed})")
    final = final_model_config(cfg, tok, base_tok)
    if final.vocab_size == start.vocab_size and (base_tok is None or base_tok.vocab_size == tok.vocab_size):
        return model
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    graphdef, abs_state = nnx.split(abstract_model(final))
    shardings = nnx.to_pure_dict(state_shardings(abs_state, mesh, "train"))
    params, _ = resize_vocab(params, start, base_tok, tok, cfg.vocab_multiple, shardings)
    nnx.replace_by_pure_dict(abs_state, params)
    log(f"vocabulary {start.vocab_size} -> {final.vocab_size} rows ({tok.vocab_size - base_tok.vocab_size} new tokens "
        "initialised to the mean of their old pieces)")
    return nnx.merge(graphdef, abs_state)


def peak_flops(cfg: TrainConfig, mesh) -> float | None:
    """Peak FLOP/s for MFU: log.peak_tflops, else the hardware preset's device figure.

    Virtual CPU devices share one processor, so on the cpu preset the device figure is the whole
    machine; on real hardware it is multiplied by the number of devices in the mesh.
    """
    if cfg.log.peak_tflops:
        return cfg.log.peak_tflops * 1e12
    from rsdjax.hardware import load_hardware

    spec = load_hardware(cfg.hardware or "cpu")
    devices = 1 if jax.default_backend() == "cpu" else mesh.devices.size
    return spec.device.peak_tflops.value * 1e12 * devices


def stderr_log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
