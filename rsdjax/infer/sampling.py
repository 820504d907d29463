"""Token sampling for a batch of slots, each slot with its own settings held as arrays.

Everything here is traced into the engine's jitted prefill and decode steps, so one compiled step
serves any mix of greedy and sampled requests. Order (HF and vLLM agree): penalties on the raw
logits, then temperature, top-k, top-p, min-p, then a draw. Work that only some settings need is
behind a batch-level `lax.cond` (a real branch on CPU, not a select): an all-greedy batch never
sorts the vocabulary nor draws random numbers.

Reproducibility: a request's key is made from its seed alone, and its n-th token uses
`fold_in(key, n)`, so its samples do not depend on the slot it lands in or on its neighbours.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rsdjax.infer.interface import SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's limit; the engine computes this many when any slot asks for logprobs


class SamplingError(ValueError):
    pass


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """One entry per slot."""

    temperature: jax.Array  # f32, 0 = greedy
    top_p: jax.Array  # f32, 1 = off
    top_k: jax.Array  # i32, 0 = off
    min_p: jax.Array  # f32, 0 = off
    repetition_penalty: jax.Array  # f32, 1 = off
    presence_penalty: jax.Array  # f32
    frequency_penalty: jax.Array  # f32

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams]) -> "SamplingArrays":
        f32 = lambda name: np.array([getattr(p, name) for p in params], np.float32)  # noqa: E731
        return cls(f32("temperature"), f32("top_p"), np.array([p.top_k for p in params], np.int32),
                   f32("min_p"), f32("repetition_penalty"), f32("presence_penalty"), f32("frequency_penalty"))


def validate(params: SamplingParams, vocab_size: int, where: str = "request") -> None:
    """Raise SamplingError naming the first setting out of range."""
    checks = [
        (params.max_tokens >= 1, f"max_tokens must be >= 1, got {params.max_tokens}"),
        (math.isfinite(params.temperature) and params.temperature >= 0,
         f"temperature must be a finite number >= 0, got {params.temperature}"),
        (0 < params.top_p <= 1, f"top_p must be in (0, 1], got {params.top_p}"),
        (params.top_k >= 0, f"top_k must be >= 0 (0 = off), got {params.top_k}"),
        (0 <= params.min_p <= 1, f"min_p must be in [0, 1], got {params.min_p}"),
        (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0,
         f"repetition_penalty must be a finite number > 0, got {params.repetition_penalty}"),
        # OpenAI's (and vLLM's) range; NaN fails every comparison, so it is refused here too
        (-2 <= params.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {params.presence_penalty}"),
        (-2 <= params.frequency_penalty <= 2,
         f"frequency_penalty must be in [-2, 2], got {params.frequency_penalty}"),
        (params.logprobs is None or 0 <= params.logprobs <= MAX_TOP_LOGPROBS,
         f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.logprobs}"),
        (params.prompt_logprobs is None or 0 <= params.prompt_logprobs <= MAX_TOP_LOGPROBS,
         f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.prompt_logprobs}"),
        (params.seed is None or params.seed >= 0, f"seed must be >= 0, got {params.seed}"),
    ]
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    checks.append((not bad, f"stop_token_ids: {bad[0] if bad else 0} is outside the vocabulary [0, {vocab_size})"))
    for ok, message in checks:
        if not ok:
            raise SamplingError(f"{where}: {message}")


def seed_pair(seed: int) -> tuple[int, int]:
    """A 64-bit seed as (low, high) 32-bit words for `keys_from_seeds`."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def keys_from_seeds(seeds):
    """seeds uint32 [B, 2] (low, high words) -> raw PRNG keys uint32 [B, 2]."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s[0]), s[1]))(seeds)


def apply_penalties(logits, sp: SamplingArrays, prompt_mask, counts):
    """Repetition penalty (HF: over prompt and output tokens), then presence/frequency (OpenAI: output only)."""
    seen = prompt_mask | (counts > 0)
    rp = sp.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - sp.presence_penalty[:, None] * (counts > 0) - sp.frequency_penalty[:, None] * counts


def _top_k_top_p(logits, sp: SamplingArrays):
    vocab = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    # top-p over what top-k kept: the smallest head of the sorted distribution with mass >= top_p
    desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < sp.top_p[:, None]) | (sp.top_p[:, None] >= 1.0)
    n_keep = jnp.maximum(jnp.sum(keep & (jnp.arange(vocab)[None, :] < k[:, None]), axis=-1), 1)
    threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def filter_logits(logits, sp: SamplingArrays):
    """Temperature, top-k, top-p, min-p: scaled logits with the removed tokens at -inf."""
    temperature = jnp.where(sp.temperature > 0, sp.temperature, 1.0)
    logits = logits / temperature[:, None]
    needs_sort = jnp.any((sp.top_k > 0) | (sp.top_p < 1.0))
    logits = jax.lax.cond(needs_sort, _top_k_top_p, lambda l, _: l, logits, sp)
    # min-p: keep tokens whose probability is >= min_p x the top probability
    floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(jnp.maximum(sp.min_p, 1e-30))[:, None]
    return jnp.where((sp.min_p[:, None] <= 0) | (logits >= floor), logits, -jnp.inf)


def argmax(logits):
    """First index of the maximum along the last axis, as two plain reductions: XLA:CPU runs the
    (value, index) reduction of `jnp.argmax` 2-3x slower over a 32K vocabulary.

    NaNs are skipped (`nanmax`), and a row with no number at all gives its last id: the result is
    always inside the vocabulary, whatever a broken model hands us."""
    vocab = logits.shape[-1]
    best = jnp.nanmax(logits, axis=-1, keepdims=True)
    index = jnp.arange(vocab, dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(logits == best, index, vocab), axis=-1), vocab - 1)


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row of a structured-output token bitmask."""
    return (vocab_size + 31) // 32


def no_constraint(rows: int, vocab_size: int) -> np.ndarray:
    """The bitmask that allows every token, for rows without a grammar."""
    return np.full((rows, bitmask_words(vocab_size)), -1, np.int32)


def fill_bitmasks(guides: Sequence, vocab_size: int) -> np.ndarray:
    """One bitmask row per entry: a guide's next allowed tokens, or everything where the entry is None."""
    mask = no_constraint(len(guides), vocab_size)
    for row, guide in enumerate(guides):
        if guide is not None:
            guide.fill_bitmask(mask[row])
    return mask


def unpack_bitmask(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """int32 [..., W] -> bool [..., vocab] (host side, for the fake engine and tests)."""
    bits = (words[..., :, None].astype(np.int64) >> np.arange(32)) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :vocab_size].astype(bool)


def apply_bitmask(logits, bitmask):
    """Structured output: bitmask int32 [B, ceil(V / 32)], bit j of word i allowing token 32 i + j
    (llguidance's packing; all ones = unconstrained) -> logits with disallowed tokens at -inf."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :logits.shape[-1]].astype(bool)
    return jnp.where(allowed, logits, -jnp.inf)


def sample(logits, sp: SamplingArrays, keys, steps, prompt_mask, counts, bitmask=None):
    """logits float32 [B, V] -> token ids int32 [B].

    keys uint32 [B, 2]: each slot's request key; steps int32 [B]: how many tokens the request has
    sampled so far; prompt_mask bool [B, V]: tokens in the prompt; counts int32 [B, V]: output counts;
    bitmask int32 [B, ceil(V / 32)]: the tokens each row's grammar allows (`apply_bitmask`), or None.
    """
    if bitmask is not None:
        logits = apply_bitmask(logits, bitmask)
    any_penalty = jnp.any((sp.repetition_penalty != 1.0) | (sp.presence_penalty != 0.0) | (sp.frequency_penalty != 0.0))
    logits = jax.lax.cond(any_penalty, apply_penalties, lambda l, *_: l, logits, sp, prompt_mask, counts)
    greedy = argmax(logits)

    def draw():
        filtered = filter_logits(logits, sp)
        step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(step_keys)
        drawn = argmax(filtered + noise)  # Gumbel-max = a categorical draw
        return jnp.where(sp.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.all(sp.temperature == 0), lambda: greedy, draw)


def token_logprobs(logits, tokens, k: int):
    """Log-probabilities under the model's raw distribution (before penalties and temperature, as
    vLLM reports them): the chosen token's [B], and the top k [B, k] (ids and values)."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logprobs, k)
    return chosen, top_ids.astype(jnp.int32), top_values
