"""`SlotEngine`: a fixed number of decode slots over one sharded KV cache (the `Engine` protocol).

    prefill(request)  run one prompt (padded to a length bucket) and sample its first token
    insert(prefix, s) copy the prompt's K/V into slot s and arm the slot's sampling state
    generate()        one decode step for all slots (idle ones ride along), events for the busy ones
    free(s)           the slot may be reused

Device state is a `LayerCache` ([slots, kv_heads, max_context, head_dim] per layer) and a
`SlotState` (per-slot next token, position, sampling settings, PRNG key, token counts); the jitted
steps live in `rsdjax.infer.steps`. This module is the host side: it keeps the bookkeeping
(lengths, EOS, max_tokens) and reads back only the sampled ids (and logprobs when asked), once per
step.

Compiled shapes: prefill once per (batch, length bucket), decode once per attention bucket (the
smallest bucket covering the longest active context), insert once per prefill shape. A new prompt
length therefore does not recompile. Use from one thread.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from rsdjax.config import ConfigError
from rsdjax.infer import forward, staged
from rsdjax.infer.adapters import AdapterPool
from rsdjax.infer.events import check_request, prompt_logprob_entries, token_event
from rsdjax.infer.interface import Prefix, Request, TokenEvent
from rsdjax.infer.sampling import MAX_TOP_LOGPROBS, SamplingArrays, fill_bitmasks, no_constraint, seed_pair
from rsdjax.infer.shapes import DEFAULT_MAX_CONTEXT, bucket_for, buckets
from rsdjax.infer.steps import compiled_steps, empty_cache, empty_state, layout, serving_weights
from rsdjax.parallel.mesh import make_mesh

MIN_PREFILL_BUCKET = 16
MIN_ATTEND_BUCKET = 64


@dataclasses.dataclass
class _Prefilled:
    """`Prefix.state`: row `row` of a (possibly batched) prefill's outputs."""

    cache: forward.LayerCache  # [rows, kv_heads, bucket, head_dim] per layer
    keys: jax.Array
    prompt_mask: jax.Array
    row: int


@dataclasses.dataclass
class _Slot:
    request: Request
    length: int  # tokens in the cache once the pending token is written = that token's position
    generated: int  # tokens sampled (the first one came from prefill)
    done: bool = False


@dataclasses.dataclass
class _Step:
    """A decode step queued on the device: the rows it is for, and its sampled ids (and logprobs)."""

    rows: list[tuple[int, _Slot]]
    tokens: jax.Array
    logprobs: tuple | None


class SlotEngine:
    def __init__(self, model, max_slots: int = 8, max_context: int | None = None,
                 eos_token_ids: list[int] | None = None, mesh=None,
                 prefill_buckets: tuple[int, ...] | None = None, max_loras: int = 0, max_lora_rank: int = 16):
        cfg = self.cfg = model.cfg
        self.max_slots = int(max_slots)
        self.max_context = int(max_context or min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT))
        if self.max_slots < 1:
            raise ConfigError(f"max_slots must be >= 1, got {max_slots}")
        if not 2 <= self.max_context <= cfg.max_position_embeddings:
            raise ConfigError(f"max_context must be in [2, {cfg.max_position_embeddings}] (the model's "
                              f"max_position_embeddings), got {self.max_context}")
        default_eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        self.eos_token_ids = [int(t) for t in (eos_token_ids if eos_token_ids is not None else default_eos)
                              if t is not None]
        self.mesh = mesh if mesh is not None else forward.model_mesh(model) or make_mesh({})
        chosen = sorted({min(int(b), self.max_context) for b in prefill_buckets or ()})
        self.prefill_buckets = tuple(b for b in chosen if b >= 1) or buckets(MIN_PREFILL_BUCKET, self.max_context)
        if self.prefill_buckets[-1] < self.max_context:
            self.prefill_buckets += (self.max_context,)
        self.attend_buckets = buckets(MIN_ATTEND_BUCKET, self.max_context)

        if max_loras and layout(self.mesh) is staged:  # refused here, not at the first request
            raise ConfigError(staged.NO_ADAPTERS)
        self.weights = serving_weights(model, self.mesh, self.max_slots)  # stage > 1: stacked over stages (infer/staged.py)
        self._steps = compiled_steps(cfg, self.mesh, self.max_slots, self.max_context)
        self._cache = empty_cache(cfg, self.mesh, self.max_slots, self.max_context)
        self._state = jax.device_put(empty_state(cfg, self.max_slots, self.max_context), self._steps.state_sharding)
        self._slots: list[_Slot | None] = [None] * self.max_slots
        self._ahead: _Step | None = None  # the step queued before the last one's tokens were read (generate)
        # multi-LoRA: adapters stacked on the device, one entry per batch row (rsdjax.infer.adapters)
        self.adapters = AdapterPool(cfg, self.mesh, max_loras, max_lora_rank) if max_loras else None
        self._no_constraint = jax.device_put(no_constraint(self.max_slots, cfg.vocab_size), self._steps.state_sharding)
        self._rng = np.random.default_rng()  # seeds for requests that bring none

    @property
    def vocab_size(self) -> int:
        """Token ids the model knows (rows padded for the mesh excluded)."""
        return self.cfg.logical_vocab_size

    # ------------------------------------------------------------ the Engine protocol

    def check(self, request: Request) -> None:
        """Raise (ValueError subclasses) if the request cannot run; called by prefill."""
        check_request(request, self.vocab_size, self.max_context)

    def prefill(self, request: Request) -> Prefix:
        return self.prefill_many([request])[0]

    def prefill_many(self, requests: Sequence[Request]) -> list[Prefix]:
        """Prefill several prompts in one pass per `max_slots` of them (rows padded to a power of two)."""
        for r in requests:
            self.check(r)
        out: list[Prefix] = []
        for start in range(0, len(requests), self.max_slots):
            out += self._prefill_batch(list(requests[start:start + self.max_slots]))
        return out

    def _prefill_batch(self, requests: list[Request]) -> list[Prefix]:
        rows = 1 << (len(requests) - 1).bit_length()
        length = bucket_for(max(len(r.prompt_ids) for r in requests), self.prefill_buckets)
        tokens = np.zeros((rows, length), np.int32)
        lengths = np.ones(rows, np.int32)
        seeds = np.zeros((rows, 2), np.uint32)
        params = [r.params for r in requests] + [requests[0].params] * (rows - len(requests))
        for i, r in enumerate(requests):
            tokens[i, :len(r.prompt_ids)] = r.prompt_ids
            lengths[i] = len(r.prompt_ids)
            seed = r.params.seed if r.params.seed is not None else int(self._rng.integers(0, 2**63))
            seeds[i] = seed_pair(seed)
        top_k = MAX_TOP_LOGPROBS if any(r.params.logprobs is not None for r in requests) else 0
        prompt_top_k = MAX_TOP_LOGPROBS if any(r.params.prompt_logprobs is not None for r in requests) else 0
        bitmask = fill_bitmasks([r.params.guide for r in requests] + [None] * (rows - len(requests)),
                                self.cfg.vocab_size)
        lora = self._lora([r.adapter for r in requests] + [0] * (rows - len(requests)))
        cache, keys, prompt_mask, first, logprobs, prompt = self._steps.prefill_and_sample(
            self.weights, tokens, lengths, SamplingArrays.from_params(params), seeds, bitmask, lora, top_k,
            prompt_top_k)
        first = np.asarray(first)
        logprobs = None if logprobs is None else tuple(np.asarray(a) for a in logprobs)
        prompt = None if prompt is None else tuple(np.asarray(a) for a in prompt)
        prefixes = []
        for i, r in enumerate(requests):
            slot = _Slot(r, length=len(r.prompt_ids), generated=1)
            event = self._event(slot, -1, int(first[i]), logprobs, i)
            if r.params.prompt_logprobs is not None:
                event.prompt_logprobs = prompt_logprob_entries(r.prompt_ids, r.params.prompt_logprobs, prompt, i)
            prefixes.append(Prefix(r, event, _Prefilled(cache, keys, prompt_mask, i)))
        return prefixes

    def insert(self, prefix: Prefix, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} does not exist (max_slots={self.max_slots})")
        if self._slots[slot] is not None:
            raise ValueError(f"slot {slot} is busy")
        pre: _Prefilled = prefix.state
        r = prefix.request
        params = jax.tree.map(lambda a: a[0], SamplingArrays.from_params([r.params]))
        self._cache, self._state = self._steps.insert(
            self._cache, self._state, pre.cache, pre.keys, pre.prompt_mask, pre.row, slot,
            prefix.first_token.token_id, len(r.prompt_ids), params)
        self._slots[slot] = _Slot(r, length=len(r.prompt_ids), generated=1,
                                  done=prefix.first_token.finish_reason is not None)

    def generate(self) -> list[TokenEvent]:
        """The events of one decode step. The step after it is queued on the device before this one's
        tokens are read back, so the host's reading, bookkeeping and dispatch (~0.5-1 ms a step) overlap
        the device's work instead of adding to it. A row that ended meanwhile computed one token too
        many: it is dropped. Not with a grammar in the batch: its next mask needs this step's tokens."""
        step, self._ahead = self._ahead, None
        if step is None or not any(self._live(i, s) for i, s in step.rows):
            active = self._active()
            if not active:
                return []
            step = self._dispatch(active)
        ending = {id(s) for _, s in step.rows if s.generated + 1 >= s.request.params.max_tokens}
        going_on = [(i, s) for i, s in self._active() if id(s) not in ending]  # inserted since included
        if going_on and not any(s.request.params.guide for _, s in going_on):
            self._ahead = self._dispatch(going_on)
        return self._read(step)

    def _live(self, i: int, s: _Slot) -> bool:
        return self._slots[i] is s and not s.done

    def _active(self) -> list[tuple[int, _Slot]]:
        return [(i, s) for i, s in enumerate(self._slots) if s is not None and not s.done]

    def _dispatch(self, active: list[tuple[int, _Slot]]) -> _Step:
        """Queue a decode step for every slot (idle ones ride along); `active` are the ones it is for."""
        attend = bucket_for(max(s.length for _, s in active) + 1, self.attend_buckets)
        top_k = MAX_TOP_LOGPROBS if any(s.request.params.logprobs is not None for _, s in active) else 0
        guides = [None] * self.max_slots
        for i, s in active:
            guides[i] = s.request.params.guide
        # no grammar in the batch: the all-ones mask already on the device (no transfer per step)
        bitmask = (jax.device_put(fill_bitmasks(guides, self.cfg.vocab_size), self._steps.state_sharding)
                   if any(guides) else self._no_constraint)  # the same sharding either way: one compiled step
        lora = self._lora([s.request.adapter if s is not None else 0 for s in self._slots])
        self._cache, self._state, (tokens, logprobs) = self._steps.decode_and_sample(
            self.weights, self._cache, self._state, bitmask, lora, attend, top_k)
        for _, s in active:
            s.length += 1  # the device wrote the pending token at position s.length
        return _Step(active, tokens, logprobs)

    def _read(self, step: _Step) -> list[TokenEvent]:
        tokens = np.asarray(step.tokens)
        logprobs = None if step.logprobs is None else tuple(np.asarray(a) for a in step.logprobs)
        events = []
        for i, s in step.rows:
            if not self._live(i, s):  # ended (or freed and reused) after the step was queued
                continue
            s.generated += 1
            events.append(self._event(s, i, int(tokens[i]), logprobs, i))
        return events

    def free(self, slot: int) -> None:
        """The slot may be reused. Its device-side sampling settings go back to neutral (greedy, no
        penalties), so that a batch whose live requests are all greedy takes the shortcuts again."""
        if self._slots[slot] is None:
            return
        self._slots[slot] = None
        neutral = jax.tree.map(lambda a: a[0], empty_state(self.cfg, 1, 1).params)
        params = jax.tree.map(lambda a, v: a.at[slot].set(v), self._state.params, neutral)
        self._state = dataclasses.replace(self._state, params=params)

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None]

    # ------------------------------------------------------------ helpers

    def _lora(self, adapters: list[int]):
        """The steps' `lora` argument: (pool arrays, entry per row), or None without a pool or when every
        row is on the base (the step compiled without LoRA then: a base batch pays nothing for the pool)."""
        return None if self.adapters is None else self.adapters.step_argument(adapters)

    def _event(self, s: _Slot, slot: int, token: int, logprobs, row: int) -> TokenEvent:
        event = token_event(s.request, slot, token, s.generated, self.eos_token_ids, logprobs, row)
        s.done = event.finish_reason is not None
        return event


def eos_ids_for(path: Path, cfg, tokenizer) -> list[int]:
    """EOS ids from the model config, generation_config.json and the tokenizer (chat models end turns
    with a token only the tokenizer or generation config knows). An unreadable generation_config.json
    is an error, not a silent loss of EOS ids."""
    from rsdjax.checkpoint.generation_config import eos_ids

    return eos_ids(path, cfg, tokenizer)


def parse_lora_args(values: Sequence[str]) -> dict[str, str]:
    """`--lora NAME=DIR` (or a bare DIR, named after its folder), repeatable -> {name: dir}."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, directory = v.partition("=")
        if not sep:
            name, directory = Path(v).resolve().name, v
        if not name or not directory:
            raise ConfigError(f"--lora {v!r}: expected NAME=DIR")
        if name in out:
            raise ConfigError(f"--lora {v!r}: the name {name!r} is given twice")
        out[name] = directory
    return out


def load_engine(model_path, mesh=None, max_slots: int = 8, max_context: int | None = None,
                overrides: Sequence[str] = (), lora=None, adapters: dict[str, str] | None = None,
                max_loras: int = 0, max_lora_rank: int = 16, quantize: str | None = None, kind: str = "paged",
                tokenizer=None, **paged_options):
    """An HF Llama directory, GGUF file or rsdjax checkpoint -> (engine, Tokenizer | None).

    `kind`: "paged" (the default: `rsdjax.infer.paged_engine.PagedEngine`; `paged_options` are its
    page_size, kv_cache_gb, num_pages, prefix_caching, max_step_tokens) or "slots" (the contiguous
    `SlotEngine`, which alone pipelines layers over `stage` > 1).
    The tokenizer is `tokenizer.json` in the model directory (or the GGUF's own) when there is one. `lora`: a PEFT adapter
    directory, applied (unmerged) before the engine splits the weights per layer: every request gets it.
    `adapters` {name: directory}: served side by side, chosen per request, in a pool of
    `max(max_loras, len(adapters))` entries of rank up to `max_lora_rank` (more can be loaded later).
    `quantize`: 'int8' stores every projection and the LM head as int8 (rsdjax/model/quant.py); LoRA
    stays float on top. `tokenizer`: the model's, when the caller has read it already (not read again).
    """
    if kind not in ("paged", "slots"):
        raise ConfigError(f"engine kind must be 'paged' or 'slots', got {kind!r}")
    if kind == "slots" and paged_options:
        raise ConfigError(f"{', '.join(sorted(paged_options))}: only for the paged engine")
    from rsdjax.model.quant import check_mode, quantize_serving

    quantize = check_mode(quantize)
    from rsdjax.loading import load_model
    from rsdjax.tokenizer import Tokenizer

    path = Path(model_path)
    stored = stored_quantization(path, quantize, lora, overrides)
    if stored is not None:  # an int8 checkpoint: the engine is built on the shape-only model, then given its weights
        from rsdjax.infer.quantized import load_quantized

        mesh = mesh if mesh is not None else make_mesh({})
        model, quantized = load_quantized(path, mesh)
    else:
        model = load_model(path, mesh=mesh, overrides=overrides)
    if lora is not None:
        from rsdjax.checkpoint.peft import apply_adapter

        model = apply_adapter(model, lora)
    tokenizer = tokenizer if tokenizer is not None else Tokenizer.for_model(path)
    adapters = dict(adapters or {})
    eos = eos_ids_for(path, model.cfg, tokenizer)
    common = dict(max_slots=max_slots, max_context=max_context, eos_token_ids=eos, mesh=mesh,
                  max_loras=max(max_loras, len(adapters)), max_lora_rank=max_lora_rank)
    if kind == "paged":
        from rsdjax.infer.paged_engine import PagedEngine

        engine = PagedEngine(model, **common, **paged_options)
    else:
        engine = SlotEngine(model, **common)
    if stored is not None:
        engine.weights = quantized
    elif quantize is not None:  # the float per-layer weights are freed once replaced
        engine.weights = quantize_serving(engine.weights, quantize)
    for name, directory in adapters.items():
        engine.adapters.load(name, directory)
    return engine, tokenizer


def stored_quantization(path: Path, quantize: str | None, lora=None, overrides: Sequence[str] = ()) -> str | None:
    """The mode of an int8 checkpoint at `path` (None for a float one); refuses what cannot apply to it."""
    from rsdjax.checkpoint import native

    stored = native.quantization_of(path) if path.is_dir() else None
    if stored is None:
        return None
    what = f"{path}: already quantized ({stored.get('mode')}, rsdjax convert --quantize)"
    if quantize is not None:
        raise ConfigError(f"{what}; drop --quantize {quantize}")
    if lora is not None:
        raise ConfigError(f"{what}: --lora needs the float checkpoint (with --quantize int8 the adapter "
                          "applies on top of the int8 weights)")
    if overrides:
        raise ConfigError(f"{what}: model overrides ({', '.join(overrides)}) cannot change its stored weights")
    return stored.get("mode")


__all__ = ["SlotEngine", "load_engine"]
