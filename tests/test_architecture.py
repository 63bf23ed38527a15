"""The import structure that docs/architecture.md states: floors, no upward imports, no cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vl2_jax"


def floors() -> dict[str, int]:
    """Module pattern -> floor, from the floors block of docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- floors.*?-->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no floors block"
    table = {}
    for line in block.group(1).splitlines():
        m = re.fullmatch(r"(\d+) [^:]+:\s+(.+)", line.strip())
        assert m, f"unreadable floors line: {line!r}"
        for name in m.group(2).split(","):
            table[name.strip()] = int(m.group(1))
    return table


def modules() -> dict[str, Path]:
    """Dotted name ('vl2_jax.modules.moe'; 'vl2_jax' for the package) -> file."""
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def imports(file: Path, known: set[str]) -> set[str]:
    """Every vl2_jax module `file` imports, at the top or inside functions: `from vl2_jax.x import y`
    counts as vl2_jax.x.y when that is a module, else as vl2_jax.x."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "vl2_jax":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vl2_jax"}
    return found


def floor_of(module: str, table: dict[str, int]) -> int:
    name = module.removeprefix("vl2_jax.") if module != "vl2_jax" else "vl2_jax"
    if name in table:
        return table[name]
    package = name.rsplit(".", 1)[0] + ".*"
    if package in table:
        return table[package]
    raise AssertionError(f"{module} is on no floor of docs/architecture.md; add it to the floors block")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(file, set(found)) - {name} for name, file in found.items()}


def test_every_module_has_a_floor_and_imports_only_downward():
    table, edges = floors(), graph()
    bad = []
    for module, deps in sorted(edges.items()):
        mine = floor_of(module, table)
        for dep in sorted(deps):
            theirs = floor_of(dep, table)
            siblings = module.rsplit(".", 1)[0] == dep.rsplit(".", 1)[0] and "." in module.removeprefix("vl2_jax.")
            if theirs > mine or (theirs == mine and not siblings):
                bad.append(f"{module} (floor {mine}) imports {dep} (floor {theirs})")
    assert not bad, "imports against docs/architecture.md's floors:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node, path):
        if state.get(node) == 1:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(node):], node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            visit(dep, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        visit(node, [])


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk finds imports inside functions and resolves `from vl2_jax import x` to the module x."""
    file = tmp_path / "probe.py"
    file.write_text("def f():\n    from vl2_jax import load\n    import vl2_jax.model\n")
    assert imports(file, set(modules())) == {"vl2_jax.load", "vl2_jax.model"}
