"""The package's module-level imports form no cycle, and no caller asks a method what it can do
with hasattr or by its name (capabilities in imagelm/methods/base.py do that)."""
import ast
import re
from pathlib import Path

import imagelm
from imagelm.methods import METHODS

ROOT = Path(imagelm.__file__).parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The imagelm modules a file imports at module level (what runs when it is imported)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imagelm"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("imagelm")}
    return out & modules


def test_module_level_imports_have_no_cycle():
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {m: _imports(p, set(files)) - {m} for m, p in files.items()}
    state: dict[str, int] = {}          # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_callers_ask_capabilities_not_names():
    callers = [ROOT / "train.py", ROOT / "bench.py", ROOT / "cli.py", ROOT / "api.py", ROOT / "export.py",
               *sorted((ROOT / "eval").glob("*.py"))]
    names = "|".join(sorted(METHODS))
    for f in callers:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert not re.search(r"hasattr\((method|model|m|self\.method)\b", code), f"{f.name}:{i}: {line.strip()}"
            assert not re.search(rf"""["'](?:{names})["']""", code), f"{f.name}:{i} names a method: {line.strip()}"
