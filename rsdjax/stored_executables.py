"""Whole compiled executables kept on disk, found without tracing (beside compile_cache.py).

JAX's persistent cache keys an executable by its lowered program, so even a warm start traces and
lowers every shape before it can look one up: for SmolLM2-135M's paged engine step that is 0.1-0.2 s
a shape, and 0.13 s more to trace the sampler, out of a ~3.5 s `rsdjax generate`. Here an executable
is keyed by what determines it, all known before tracing: a name, the arguments' tree, shapes,
dtypes and shardings (device ids included), the jax / jaxlib / flax versions, XLA_FLAGS, the devices
and rsdjax's build (`compile_cache.build_id`, a digest of its source files: an edit anywhere
invalidates every entry, so a stale program never runs). A hit is deserialized
(`jax.experimental.serialize_executable`); a miss lowers and compiles as usual and writes the entry.
Only an executable XLA compiled in this process is written: one JAX read from its own cache
serializes without its kernels (jaxlib 0.10.2; the copy fails at run time with "Function ... not
found"). The compile cache is kept per build for that reason, so a miss here is a miss there too.
An unreadable entry is reported, ignored and rewritten. Entries live in `<compile cache>/executables`;
with the compile cache off nothing is stored.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import sys
import time
from pathlib import Path

import jax

import rsdjax.compile_cache as compile_cache  # a module import: `from rsdjax import` is the package (test_imports)

SUBDIR = "executables"
# jax settings that change what a traced function lowers to (besides its arguments)
LOWERING_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                  "jax_threefry_partitionable")


class Stored:
    """`jitted` run through executables kept per key the caller names (a step's shape): one dict
    lookup a call, where a signature of the arguments would walk hundreds of weight arrays. The key
    must fix every argument's shape, dtype and sharding; a wrong key fails loudly (the executable
    rejects arguments it was not compiled for)."""

    def __init__(self, name: str, jitted):
        self.name, self.jitted, self._memo = name, jitted, {}

    def __call__(self, key, *args):
        if key is None:  # arguments the caller cannot key: plain jit dispatch
            return self.jitted(*args)
        self.prepare(key, *args)
        return self._memo[key](*args)

    def prepare(self, key, *args) -> None:
        """Find (or compile) the executable for `key` without running it. Reading one spends most of its
        time outside the GIL, so warm-ups load several side by side (2 threads: 0.55 -> 0.35 s for
        SmolLM2-135M's two paged forward shapes)."""
        if key is not None and key not in self._memo:
            self._memo[key] = compiled(self.name, self.jitted, *args)

    def cache_size(self) -> int:
        """Executables this function has run in this process: stored ones and jit's own."""
        return len(self._memo) + self.jitted._cache_size()


def compiled(name: str, jitted, *args) -> jax.stages.Compiled:
    """`jitted.lower(*args).compile()`, read from the store when it holds it (and written when not)."""
    root = compile_cache.active_dir()
    if root is None:
        return jitted.lower(*args).compile()
    path = root / SUBDIR / f"{name}-{_key(name, args)}"
    start = time.perf_counter()
    exe = _read(path)
    if exe is not None:
        compile_cache.count_stored(time.perf_counter() - start)
        return exe
    hits = compile_cache.stats()["cache_hits"]
    exe = jitted.lower(*args).compile()
    if compile_cache.stats()["cache_hits"] == hits:  # compiled just now: an executable XLA:CPU read from
        _write(path, exe)  # JAX's cache serializes without its kernels (jaxlib 0.10.2), so only these are stored
    return exe


def _read(path: Path):
    from jax.experimental.serialize_executable import deserialize_and_load

    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn(f"cannot read {path}: {e.strerror}")
        return None
    try:
        payload, in_tree, out_tree, device_ids = pickle.loads(blob)
        by_id = {d.id: d for d in jax.devices()}
        return deserialize_and_load(payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
    except Exception as e:  # noqa: BLE001 - a damaged entry only costs a compile
        _warn(f"ignoring the damaged entry {path.name} ({type(e).__name__}); compiling it again")
        return None


def _write(path: Path, exe) -> None:
    from jax.experimental.serialize_executable import serialize

    try:
        device_ids = [d.id for d in exe._executable._unloaded_executable.device_list]  # what it runs on, in order
        blob = pickle.dumps((*serialize(exe), device_ids))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # readers see the whole entry or none
    except (OSError, ValueError, NotImplementedError, AttributeError, pickle.PicklingError) as e:
        _warn(f"cannot store {path.name} ({type(e).__name__}: {e})")


def _key(name: str, args) -> str:
    leaves, tree = jax.tree.flatten(args)
    config = tuple(getattr(jax.config, flag) for flag in LOWERING_FLAGS)  # these can change at run time
    h = hashlib.sha256(_environment().encode())
    h.update(f"{name}|{tree}|{config}".encode())
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        devices = sorted(d.id for d in sharding.device_set) if sharding is not None else None
        h.update(repr((getattr(leaf, "shape", ()), str(getattr(leaf, "dtype", type(leaf))),
                       getattr(leaf, "weak_type", False), repr(sharding), devices)).encode())
    return h.hexdigest()[:40]


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    """What decides the compiled program besides the arguments and LOWERING_FLAGS, fixed in a process."""
    import flax
    import jaxlib

    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    return repr((jax.__version__, jaxlib.__version__, flax.__version__, os.environ.get("XLA_FLAGS", ""),
                 jax.devices()[0].client.platform_version, devices, compile_cache.build_id()))


_warned: set[str] = set()


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"rsdjax: stored executables: {message}", file=sys.stderr)
