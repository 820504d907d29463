"""Durable publishing of files and directories: fsync before the rename that makes them visible.

A rename is atomic, but without fsync a crash of the machine after it can leave the new name
pointing at data that never reached the disk (an empty or torn file under a good name). So the
order is always: write under a temporary name, fsync the data (every file of a directory), rename,
fsync the parent directory (which is what records the rename itself).

`replace_dir` swaps a new directory in for an existing one without ever deleting the old one
before the new one is complete: old -> NAME.old, new -> NAME, then NAME.old is removed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    for parent, dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(parent) / name)
        fsync_dir(Path(parent))


def publish_file(tmp: Path, final: Path) -> None:
    """Rename a fully written `tmp` over `final`, durably."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def write_text(path: Path, text: str) -> None:
    """Write a small text file atomically and durably (never a half-written file under `path`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    publish_file(tmp, path)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the fully written directory `tmp` to `final` (absent or empty), durably."""
    fsync_tree(tmp)
    if final.exists():
        final.rmdir()  # only ever empty here: callers refuse to overwrite a non-empty one
    os.rename(tmp, final)
    fsync_dir(Path(final).parent)


def replace_dir(new: Path, final: Path) -> None:
    """Put the complete directory `new` in place of `final`; the old `final` is removed only after."""
    new, final = Path(new), Path(final)
    old = final.with_name(final.name + ".old")
    fsync_tree(new)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by an earlier replace that was killed: obsolete
        os.rename(final, old)
    os.rename(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
