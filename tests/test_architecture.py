"""The layout the code map (docs/architecture.md) describes: no import cycles between the project's modules,
nothing imports main.py, every --mode is dispatched, and functions stay short."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Project modules that ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return {m for m in found if m in MODULES and m != path.stem}


def test_no_import_cycles_and_nothing_imports_main():
    graph = {m: imports_of(p) for m, p in MODULES.items()}
    assert not [m for m, deps in graph.items() if "main" in deps]
    for extra in [*ROOT.glob("bench/*.py"), *ROOT.glob("assets/*.py")]:
        assert "main" not in imports_of(extra), extra

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, graph) if c]
    assert not cycles, cycles


def test_every_mode_is_dispatched():
    import main
    import options

    assert set(main.MODES) == set(options.MODES)
    for mode in main.MODES:
        assert callable(main.mode_function(mode)), mode


def test_functions_are_short():
    """About 60 lines at most outside tests and benchmarks (the option parser is a list of arguments)."""
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                if node.end_lineno - node.lineno + 1 > 65:
                    long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_help_shows_every_default(capsys):
    import pytest

    from options import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--batchSize", "16"), ("--lr", "0.001"), ("--ckpt", "latest"), ("--negCache", "on"),
                          ("--cacheRefreshRate", "1000"), ("--runsPath", "./data/runs")):
        help_text = re.search(rf" {flag} \S+ (.*?)(?= --[a-zA-Z_-]+ [A-Z{{]|$)", text.split(" options: ", 1)[1])
        assert f"(default: {default})" in help_text.group(1), flag
