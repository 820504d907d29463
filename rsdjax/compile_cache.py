"""JAX's persistent compilation cache, on by default for every `rsdjax` command.

A cold `rsdjax generate` of a 135M model spends most of its wall time compiling (prefill, insert,
one decode shape per attention bucket, the weight split). With the cache, the second run of the same
shapes loads the executables from disk instead. Where: `$RSDJAX_CACHE_DIR`, else
`~/.cache/rsdjax/jax`; `--no-compile-cache` (or `RSDJAX_CACHE_DIR=off`) turns it off.

Every compile is cached (JAX's default skips compiles under 1 s, which is most of ours on a CPU).
A damaged entry is not fatal: JAX warns, compiles again and overwrites it.

Entries are kept per build of rsdjax (`build-<digest of its source files>/` under that directory),
as vLLM keeps its compile cache per version: an upgrade or an edit starts an empty one, so every
program compiles fresh once, which is what lets stored_executables.py keep it whole (an executable
JAX read from its cache does not serialize). The newest `KEEP_BUILDS` builds are kept.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

OFF = ("", "0", "off", "none", "false")
KEEP_BUILDS = 3

# jax.monitoring event names (jax/_src/dispatch.py, compiler.py): the first is timed around every
# executable JAX asks for (compiled or read from the cache), the second counts cache reads that hit
_COMPILE = "/jax/core/compile/backend_compile_duration"
_HITS = "/jax/compilation_cache/cache_hits"
_counts = {"compiles": 0, "hits": 0, "stored": 0, "seconds": 0.0}
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
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_dir()
    if root is None:
        disable()
        return None
    path = root / f"build-{build_id()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.utime(path)  # its age: the builds used last are the ones kept
    except OSError as e:  # an unwritable cache only costs speed
        print(f"rsdjax: compile cache disabled: cannot create {path}: {e.strerror}", file=sys.stderr)
        return None
    _prune(root, keep=path)
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


@functools.lru_cache(maxsize=1)
def build_id() -> str:
    """A digest of rsdjax's own source files (16 hex digits)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for file in sorted(package.rglob("*.py")):
        digest.update(str(file.relative_to(package)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _prune(root: Path, keep: Path) -> None:
    """Remove all but the KEEP_BUILDS most recently used build directories (never `keep`)."""
    try:
        builds = sorted((p for p in root.glob("build-*") if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in [p for p in builds if p != keep][KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


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
            "compiled": _counts["compiles"] - _counts["hits"], "stored_hits": _counts["stored"],
            "compile_s": round(_counts["seconds"], 3)}


def count_stored(seconds: float) -> None:
    """An executable read whole from the store (stored_executables.py): needed, and a cache hit."""
    for name in ("compiles", "hits", "stored"):
        _counts[name] += 1
    _counts["seconds"] += seconds


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
