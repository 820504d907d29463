"""Makes `lm_eval --model rsdjax` work from the shell.

lm-eval 0.4.13 discovers models only through its own `lm_eval.models` module (no entry points, no
plugin option), so this installs a two-file hook into site-packages: `rsdjax_lm_eval_hook.pth`
imports `rsdjax_lm_eval_hook.py` at interpreter start; that module (standard library only, no
rsdjax or lm-eval import) waits for `lm_eval.models` to be imported and then registers the lazy
name `rsdjax` -> `rsdjax.eval.harness:RsdjaxLM`. Nothing else is touched; without lm-eval the hook
does nothing.

    python -m rsdjax.eval.lm_eval_hook install      (make does this when it builds the venv)
    python -m rsdjax.eval.lm_eval_hook uninstall
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

MODULE = "rsdjax_lm_eval_hook"
HOOK_SOURCE = '''"""Installed by rsdjax (python -m rsdjax.eval.lm_eval_hook): `lm_eval --model rsdjax`."""
import importlib.machinery
import sys

TARGET = "rsdjax.eval.harness:RsdjaxLM"


class _Loader:
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        from lm_eval.api.registry import model_registry

        if "rsdjax" not in model_registry:
            model_registry.register("rsdjax", target=TARGET)


class _Finder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())  # (a module runs once per process)
'''


def site_dir() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install(directory: Path | None = None) -> list[Path]:
    directory = Path(directory or site_dir())
    module, pth = directory / f"{MODULE}.py", directory / f"{MODULE}.pth"
    module.write_text(HOOK_SOURCE, encoding="utf-8")
    pth.write_text(f"import {MODULE}\n", encoding="utf-8")
    return [module, pth]


def uninstall(directory: Path | None = None) -> list[Path]:
    directory = Path(directory or site_dir())
    removed = [p for p in (directory / f"{MODULE}.pth", directory / f"{MODULE}.py") if p.exists()]
    for p in removed:
        p.unlink()
    return removed


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action not in ("install", "uninstall"):
        print("usage: python -m rsdjax.eval.lm_eval_hook install|uninstall", file=sys.stderr)
        sys.exit(2)
    for p in (install if action == "install" else uninstall)():
        print(f"{action}ed {p}")
