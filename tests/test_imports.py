"""The package's import graph has no cycle, lazy imports inside functions included: a
cycle makes the import order matter and hides which module depends on which."""

import ast
from pathlib import Path

import learn2defend

PACKAGE = Path(learn2defend.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("learn2defend", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            for alias in node.names:  # `from . import distributed` imports the submodule
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    # A submodule importing its own package's registry (models.classifiers -> models) is the
    # registration idiom, not a dependency loop between peers.
    return {m for m in found & modules if m != name and not name.startswith(m + ".")}


def test_no_import_cycles():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(files)) for name, path in files.items()}
    assert graph["learn2defend.evaluate"] >= {"learn2defend.checks"}  # the graph is really read

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    # The package __init__ imports everything; only cycles between the modules themselves count.
    cycles = [c for name in graph if name != "learn2defend" and (c := cycle_from(name)) and "learn2defend" not in c]
    assert cycles == []


def test_readers_of_run_folders_do_not_import_the_training_loop():
    """The run folder is a format (learn2defend.runs); reading one needs no training code."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for reader in ("evaluate", "export", "figures", "learned_attack"):
        imports = _imports(files[f"learn2defend.{reader}"], set(files))
        assert "learn2defend.runs" in imports, reader
        assert "learn2defend.train" not in imports, reader
