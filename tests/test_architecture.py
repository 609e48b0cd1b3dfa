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
    """60 lines at most outside tests and benchmarks (the option parser is a list of arguments)."""
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                if node.end_lineno - node.lineno + 1 > 60:
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


# ---------------------------------------------------------------- where the options travel

ENGINE = ("evaluate", "search", "shortlist", "seqMatchNet", "datasets", "distributed", "metrics", "mining",
          "velocity", "speeds", "blocks")
MODE_FILES = ("train", "test", "localize", "extract", "prepare", "demo", "report")
MAX_MODULE_LINES = 650


def functions_of(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Top-level functions by name and methods as ``Class.method``."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return out


def imported_names(tree: ast.Module) -> dict[str, tuple[str, str | None]]:
    """Local name -> (project module, name in it or None for the module itself), imports anywhere."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    names[a.asname or a.name] = (a.name, None)
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = (node.module, a.name)
    return names


class OptionsFlow:
    """Follows the options namespace through calls: a function receives it when a call passes a name
    (or an attribute ``x.opt``) that holds it in that function as an argument."""

    def __init__(self) -> None:
        self.trees = {m: ast.parse(p.read_text()) for m, p in MODULES.items()}
        self.functions = {m: functions_of(t) for m, t in self.trees.items()}
        self.imports = {m: imported_names(t) for m, t in self.trees.items()}

    def resolve(self, module: str, func: ast.expr) -> tuple[str, str] | None:
        if isinstance(func, ast.Name):
            if func.id in self.functions[module]:
                return module, func.id
            target = self.imports[module].get(func.id)
            if target and target[1]:
                return target if target[1] in self.functions[target[0]] else (target[0], f"{target[1]}.__init__")
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner = func.value.id
            target = self.imports[module].get(owner)
            if target and target[1] is None:
                return target[0], func.attr
            if owner in {n.split(".")[0] for n in self.functions[module]}:
                return module, f"{owner}.{func.attr}"
            if target and target[1]:
                return target[0], f"{target[1]}.{func.attr}"
        return None

    def reached(self, module: str, name: str, param: str = "opt") -> set[str]:
        seen, todo = set(), [(module, name, param)]
        while todo:
            mod, fn, carrier = todo.pop()
            node = self.functions.get(mod, {}).get(fn)
            if node is None or (mod, fn, carrier) in seen:
                continue
            seen.add((mod, fn, carrier))
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                callee = self.resolve(mod, call.func)
                if callee is None or callee[1] not in self.functions.get(callee[0], {}):
                    continue
                params = [a.arg for a in self.functions[callee[0]][callee[1]].args.args]
                if params and params[0] in ("self", "cls"):
                    params = params[1:]
                passed = [(i, a) for i, a in enumerate(call.args)] + [(k.arg, k.value) for k in call.keywords]
                for where, arg in passed:
                    holds = (isinstance(arg, ast.Name) and arg.id == carrier) or (
                        isinstance(arg, ast.Attribute) and arg.attr == "opt")
                    if holds:
                        target = params[where] if isinstance(where, int) and where < len(params) else where
                        if isinstance(target, str):
                            todo.append((callee[0], callee[1], target))
        return {m for m, _, _ in seen}


def test_options_stop_at_the_mode_files():
    """The options reach the engine only through ``*Config.from_options``; from ``train.train`` they
    enter at most 8 modules, from ``test.run_test`` at most 7."""
    flow = OptionsFlow()
    from_train, from_test = flow.reached("train", "train"), flow.reached("test", "run_test")
    assert "test" not in from_train
    assert len(from_train) <= 8, sorted(from_train)
    assert len(from_test) <= 7, sorted(from_test)
    for module in ENGINE:
        if module not in flow.functions:
            continue
        for name, node in flow.functions[module].items():
            params = {a.arg for a in node.args.args + node.args.kwonlyargs}
            if "opt" in params or "options" in params:
                assert name.endswith("from_options"), f"{module}.{name} takes the options"


def test_train_does_not_import_the_test_mode():
    assert "test" not in imports_of(MODULES["train"])


def test_modules_are_short():
    long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert not {m: n for m, n in long.items() if n > MAX_MODULE_LINES}
    assert len(MODULES["test"].read_text().splitlines()) <= 200


def test_options_read_directly_outside_options_and_prepare():
    """``getattr(opt, name, default)`` restates a default away from the parser: only the parser
    module and prepare (whose namespace is its own) may do it."""
    found = []
    for name, path in MODULES.items():
        if name in ("options", "prepare"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and len(node.args) == 3 and isinstance(node.args[0], ast.Name) and node.args[0].id == "opt"):
                found.append(f"{name}:{node.lineno}")
    assert not found, found
