"""No import circles in rsdjax, and every module imports on its own (in a fresh module table)."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "rsdjax"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imported(tree: ast.AST, known: dict) -> set[str]:
    """rsdjax modules a file imports, at module level or inside functions (not under TYPE_CHECKING)."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(m for m in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if m in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_import_circles():
    known = modules()
    graph = {m: imported(ast.parse(p.read_text(encoding="utf-8")), known) - {m} for m, p in known.items()}
    circles, state = [], {}

    def walk(m, path):  # depth-first; a grey node reached again closes a circle
        state[m] = "grey"
        for n in sorted(graph[m]):
            if state.get(n) == "grey":
                circles.append(path[path.index(n):] + [n])
            elif n not in state:
                walk(n, path + [n])
        state[m] = "black"

    for m in known:
        if m not in state:
            walk(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_each_module_imports_alone():
    names = sorted(m for m in modules() if not m.endswith("__main__"))  # entry points run on import
    script = f"""
import importlib, sys
failed = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "rsdjax" or m.startswith("rsdjax.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
