"""The host side of one sampled token, shared by both engines: whether it ends its request and the
logprobs the request asked for."""
from __future__ import annotations

from rsdjax.infer.interface import Request, TokenEvent


def token_event(request: Request, slot: int, token: int, generated: int, eos_token_ids, logprobs,
                row: int) -> TokenEvent:
    """`generated`: tokens sampled so far, this one included. `logprobs`: the step's (chosen, top ids,
    top values) arrays, or None when no row asked; `row` is this request's row in them."""
    p = request.params
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
