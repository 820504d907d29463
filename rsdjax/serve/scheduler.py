"""Continuous batching: one thread drives the engine; asyncio handlers talk to it through queues.

The engine (JAX) is used from a single dedicated thread, so the event loop never blocks on a
decode step and JAX never sees two callers. Each loop iteration of that thread:
  1. frees the slots of cancelled requests (client gone, stop string seen) -- at once, before the
     next decode step;
  2. admits waiting requests into free slots (prefill + insert): new requests join the running batch;
  3. runs one decode step for all active slots and hands each request its tokens.
Tokens go back to the request's asyncio.Queue with `loop.call_soon_threadsafe`, one call per request
per step. The waiting queue is bounded; `submit` raises `QueueFullError` (-> 429) when it is full.

Whose fault: `engine.check(request)` refusing is the request's (-> 400); anything `prefill`,
`insert` or `generate` raise after that is the engine's: every request in flight fails (-> 500)
and the scheduler stops, so `/health` turns unhealthy instead of a broken engine looking healthy.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time

from rsdjax.infer.interface import Engine, PromptTooLongError, Request, TokenEvent
from rsdjax.serve.metrics import ServerMetrics

log = logging.getLogger("rsdjax.serve")


class QueueFullError(Exception):
    pass


class EngineDeadError(Exception):
    """The engine raised during a decode step; its state is unknown, so the server stops serving."""


class EngineFaultError(RuntimeError):
    """The engine raised on a request it had accepted (not a ValueError of the request's own)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One engine request as the scheduler tracks it."""

    request: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # receives list[TokenEvent] per step, or one BaseException
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    prefill_start: float | None = None
    first_token: float | None = None
    slot: int | None = None
    generated: int = 0
    finished: bool = False

    def deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class Scheduler:
    def __init__(self, engine: Engine, metrics: ServerMetrics, max_waiting: int = 256):
        if max_waiting < 1:  # 0 would refuse every request with 429 while /health says ok
            raise ValueError(f"max_waiting must be >= 1 (requests queued for a slot before 429), got {max_waiting}")
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cancelled: list[Job] = []
        self._running: dict[int, Job] = {}  # slot -> job; touched only by the engine thread
        self._num_running = 0  # mirror of len(_running) for other threads
        self._stop = False
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rsdjax-engine", daemon=True)

    # ------------------------------------------------------------ called from the event loop

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> Job:
        job = Job(request, asyncio.get_running_loop(), asyncio.Queue())
        with self._cv:
            if self.dead is not None:
                raise EngineDeadError(f"the engine failed: {self.dead!r}")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting for a slot")
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop generating for `job` and free its slot before the next decode step."""
        with self._cv:
            if job.finished:
                return
            job.finished = True
            try:
                self._waiting.remove(job)
                self.metrics.waiting.set(len(self._waiting))
            except ValueError:  # already admitted: the engine thread frees the slot
                self._cancelled.append(job)
                self._cv.notify()

    def load(self) -> dict:
        return {"running": self._num_running, "waiting": len(self._waiting),
                "max_slots": self.engine.max_slots, "max_waiting": self.max_waiting}

    # ------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._cancelled or self._running or self._waiting):
                    self._cv.wait()
                if self._stop:
                    break
                cancelled, self._cancelled = self._cancelled, []
            for job in cancelled:
                self._release(job)
            try:
                self._admit()
                if self._running:
                    self._step()
            except Exception as e:  # noqa: BLE001 -- a broken engine must not hang every client
                log.exception("engine failed")
                self._fail_everything(e)
                return
            self._update_gauges()
        self._fail_everything(EngineDeadError("server shutting down"), dead=False)

    def _admit(self) -> None:
        free = self.engine.free_slots()
        while free:
            with self._cv:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self.metrics.waiting.set(len(self._waiting))
            job.prefill_start = time.perf_counter()
            self.metrics.queue_time.observe(job.prefill_start - job.arrival)
            check = getattr(self.engine, "check", None)
            try:
                if check is not None:
                    check(job.request)
                    prefix = self._prefill(job)
                else:  # an engine without `check` validates in prefill: its ValueErrors are the request's
                    prefix = self.engine.prefill(job.request)
            except (PromptTooLongError, ValueError) as e:  # this request's fault, not the engine's
                job.finished = True
                job.deliver(e)
                continue
            with self._cv:
                cancelled = job.finished  # the client went away while its prompt was prefilled
            if cancelled:
                continue
            self.metrics.prompt_tokens.inc(len(job.request.prompt_ids))
            first = prefix.first_token  # None: the engine prefills inside generate() (chunked)
            if first is None or first.finish_reason is None:
                slot = free.pop(0)
                self.engine.insert(prefix, slot)
                job.slot = slot
                self._running[slot] = job
                self._num_running = len(self._running)
            if first is not None:
                self._dispatch(job, [first])

    def _prefill(self, job: Job):
        """The engine's prefill of a checked request: an error here is the engine's, not the request's."""
        try:
            return self.engine.prefill(job.request)
        except Exception as e:
            with self._cv:
                self._waiting.appendleft(job)  # so that `_fail_everything` tells this client too
            raise EngineFaultError(f"prefill failed: {e!r}") from e

    def _step(self) -> None:
        events = self.engine.generate()
        by_slot: dict[int, list[TokenEvent]] = collections.defaultdict(list)
        for event in events:
            by_slot[event.slot].append(event)
        for slot, job_events in by_slot.items():
            job = self._running.get(slot)
            if job is None or job.request.id != job_events[0].request_id:
                raise RuntimeError(f"engine returned a token for slot {slot} ({job_events[0].request_id}) "
                                   f"which the scheduler does not know")
            self._dispatch(job, job_events)

    def _dispatch(self, job: Job, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        if job.first_token is None:
            job.first_token = now
            self.metrics.ttft.observe(now - job.arrival)
        job.generated += len(events)
        self.metrics.generation_tokens.inc(len(events))
        if events[-1].finish_reason is not None:  # free the slot before the client hears it is done
            with self._cv:
                job.finished = True
            self._release(job)
        job.deliver(events)

    def _release(self, job: Job) -> None:
        if job.slot is not None and self._running.get(job.slot) is job:
            self.engine.free(job.slot)
            del self._running[job.slot]
            self._num_running = len(self._running)
        job.slot = None

    def _update_gauges(self) -> None:
        e = self.engine
        self.metrics.running.set(len(self._running))
        self.metrics.slot_usage.set(len(self._running) / e.max_slots)
        stats = e.stats() if hasattr(e, "stats") else None
        if stats is not None:  # a paged engine counts its pages (and its prefix cache)
            self.metrics.kv_cache_usage.set(stats["kv_cache_usage"])
            self.metrics.engine_stats(stats)
        else:
            used = sum(len(j.request.prompt_ids) + j.generated for j in self._running.values())
            self.metrics.kv_cache_usage.set(used / (e.max_slots * e.max_context))

    def _fail_everything(self, error: BaseException, dead: bool = True) -> None:
        with self._cv:
            if dead:
                self.dead = error
            jobs = list(self._running.values()) + list(self._waiting)
            self._waiting.clear()
            self._running.clear()
            self._num_running = 0
        for job in jobs:
            job.finished = True
            job.deliver(EngineDeadError(f"the engine failed: {error!r}") if dead else error)
