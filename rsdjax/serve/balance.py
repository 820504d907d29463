"""Backends of the router and the policies that pick one per request.

- round-robin: healthy backends in turn.
- least-loaded: the fewest requests this router has in flight there (ties in turn, so light
  sequential load still spreads evenly).
- session: requests with the same session key (X-Session-ID header, else the `user` field) go to
  the same backend, chosen by rendezvous hashing: when a backend dies only its sessions move, and
  they come back when it recovers. Requests without a key are placed least-loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools


@dataclasses.dataclass(eq=False)
class Backend:
    url: str
    healthy: bool = False  # until the first health check says otherwise
    in_flight: int = 0
    served: int = 0
    last_error: str | None = None
    models: list[str] | None = None  # from its /health; None = unknown (then it may serve any model)
    failures: int = 0  # consecutive failures (requests or health checks): the probe backoff grows with them
    next_check: float = 0.0  # monotonic time of its next health check

    def serves(self, model: str | None) -> bool:
        return self.models is None or model is None or model in self.models


class Policy:
    name = ""

    def __init__(self):
        self._turn = itertools.count()

    def choose(self, candidates: list[Backend], session: str | None) -> Backend:
        raise NotImplementedError

    def _in_turn(self, candidates: list[Backend]) -> Backend:
        return candidates[next(self._turn) % len(candidates)]


class RoundRobin(Policy):
    name = "round-robin"

    def choose(self, candidates, session):
        return self._in_turn(candidates)


class LeastLoaded(Policy):
    name = "least-loaded"

    def choose(self, candidates, session):
        low = min(b.in_flight for b in candidates)
        return self._in_turn([b for b in candidates if b.in_flight == low])


class SessionAffinity(LeastLoaded):
    name = "session"

    def choose(self, candidates, session):
        if session is None:
            return super().choose(candidates, session)
        return max(candidates, key=lambda b: hashlib.sha256(f"{session}\0{b.url}".encode()).digest())


POLICIES = {p.name: p for p in (RoundRobin, LeastLoaded, SessionAffinity)}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()
