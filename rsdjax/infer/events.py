"""The host side shared by both engines: checking a request, what one sampled token means (whether
it ends its request, the logprobs it asked for, its grammar advancing), and prompt logprobs."""
from __future__ import annotations

from rsdjax.infer.interface import PromptTooLongError, Request, TokenEvent
from rsdjax.infer.sampling import validate


def check_request(request: Request, vocab_size: int, context: int) -> None:
    """Raise (ValueError subclasses) naming what is wrong: an empty prompt, a token outside
    [0, vocab_size), a sampling setting out of range, prompt + max_tokens over `context`."""
    ids, p = request.prompt_ids, request.params
    where = f"request {request.id}"
    if not ids:
        raise ValueError(f"{where}: empty prompt")
    bad = [t for t in ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"{where}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    validate(p, vocab_size, where)
    if len(ids) + p.max_tokens > context:
        raise PromptTooLongError(len(ids), p.max_tokens, context)


def token_event(request: Request, slot: int, token: int, generated: int, eos_token_ids, logprobs,
                row: int) -> TokenEvent:
    """`generated`: tokens sampled so far, this one included. `logprobs`: the step's (chosen, top ids,
    top values) arrays, or None when no row asked; `row` is this request's row in them. A request's
    grammar guide consumes the token (once complete, the guide allows only EOS)."""
    p = request.params
    if p.guide is not None:
        p.guide.consume(token)
    finish = None
    if (token in eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
        finish = "stop"
    elif generated >= p.max_tokens:
        finish = "length"
    lp = top = None
    if p.logprobs is not None and logprobs is not None:
        chosen, top_ids, top_values = logprobs
        lp = float(chosen[row])
        top = {int(t): float(v) for t, v in zip(top_ids[row, :p.logprobs], top_values[row, :p.logprobs])} or None
    return TokenEvent(request.id, slot, token, logprob=lp, top_logprobs=top, finish_reason=finish)


def prompt_logprob_entries(prompt_ids: list[int], k: int, arrays, row: int) -> list:
    """`TokenEvent.prompt_logprobs` for one prompt from (chosen, top ids, top values, rank) arrays
    [rows, T(, k)] whose position t scores prompt token t + 1: None for the first token, then
    (logprob, top k plus the token itself, as vLLM reports prompt logprobs, the token's rank)."""
    chosen, top_ids, top_values, rank = arrays
    out: list = [None]
    for t in range(1, len(prompt_ids)):
        top = {int(i): float(v) for i, v in zip(top_ids[row, t - 1, :k], top_values[row, t - 1, :k])}
        lp = float(chosen[row, t - 1])
        top.setdefault(int(prompt_ids[t]), lp)
        out.append((lp, top, int(rank[row, t - 1])))
    return out
