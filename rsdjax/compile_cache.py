"""JAX's persistent compilation cache, on by default for every `rsdjax` command.

A cold `rsdjax generate` of a 135M model spends most of its wall time compiling (prefill, insert,
one decode shape per attention bucket, the weight split). With the cache, the second run of the same
shapes loads the executables from disk instead. Where: `$RSDJAX_CACHE_DIR`, else
`~/.cache/rsdjax/jax`; `--no-compile-cache` (or `RSDJAX_CACHE_DIR=off`) turns it off.

Every compile is cached (JAX's default skips compiles under 1 s, which is most of ours on a CPU).
A damaged entry is not fatal: JAX warns, compiles again and overwrites it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

OFF = ("", "0", "off", "none", "false")

# jax.monitoring event names (jax/_src/dispatch.py, compiler.py): the first is timed around every
# executable JAX asks for (compiled or read from the cache), the second counts cache reads that hit
_COMPILE = "/jax/core/compile/backend_compile_duration"
_HITS = "/jax/compilation_cache/cache_hits"
_counts = {"compiles": 0, "hits": 0, "seconds": 0.0}
_listening = False
_active: Path | None = None


def default_dir() -> Path | None:
    """The cache directory the environment asks for (None when it says off)."""
    env = os.environ.get("RSDJAX_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env).expanduser()
    return Path.home() / ".cache" / "rsdjax" / "jax"


def enable(cache_dir: Path | str | None = None) -> Path | None:
    """Turn the persistent cache on at `cache_dir` (default: `default_dir()`); returns the directory used.

    Call before the first compile. Before JAX is imported this only sets JAX's environment variables
    (so nothing here initialises a backend before the CLI has set up virtual CPU devices).
    """
    global _active
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_dir()
    if path is None:
        disable()
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # an unwritable cache only costs speed
        print(f"rsdjax: compile cache disabled: cannot create {path}: {e.strerror}", file=sys.stderr)
        return None
    settings = {"jax_compilation_cache_dir": str(path),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    if "jax" in sys.modules:
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
    else:
        for name, value in settings.items():
            os.environ[name.upper()] = str(value)
    _listen()
    _active = path
    return path


def disable() -> None:
    """Keep JAX from using a persistent cache (even one its own environment variables name)."""
    global _active
    _active = None
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_compilation_cache_dir", None)
    _listen()


def active_dir() -> Path | None:
    """The directory `enable` turned on (None when off)."""
    return _active


def stats() -> dict:
    """Executables this process needed, how many came from the cache, how many XLA compiled, and the
    seconds all of that took (counted from `enable`/`disable` on)."""
    return {"executables": _counts["compiles"], "cache_hits": _counts["hits"],
            "compiled": _counts["compiles"] - _counts["hits"], "compile_s": round(_counts["seconds"], 3)}


def _listen() -> None:
    global _listening
    if _listening:
        return
    import jax.monitoring

    def on_event(event: str, **_):
        if event == _HITS:
            _counts["hits"] += 1

    def on_duration(event: str, seconds: float, **_):
        if event == _COMPILE:
            _counts["compiles"] += 1
            _counts["seconds"] += seconds

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    _listening = True
