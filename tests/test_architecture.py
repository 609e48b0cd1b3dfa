"""The layout the code map (docs/architecture.md) describes, on the top level and the whole package:
the top level holds what a user runs (at most 13 files) and imports the package, the package imports
nothing of the top level, no import cycles, one mode table, short modules and functions, narrow
signatures, and the options namespace stops at the mode files and the two factories."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "seqmatchnet"
TOP = {p.stem: p for p in ROOT.glob("*.py")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PACKAGE_MODULES = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
MODULES = {**TOP, **PACKAGE_MODULES}

MAX_TOP_FILES = 13
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 50
MAX_PARAMETERS = 8
MAX_LINE = 100


def imported_names(tree: ast.Module, anywhere: bool = True) -> dict[str, tuple[str, str | None]]:
    """Local name -> (project module, name in it or None for the module itself), imports anywhere
    (or only at module level)."""
    names = {}
    for node in (ast.walk(tree) if anywhere else tree.body):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    names[a.asname or a.name.split(".")[0]] = (a.name, None)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    names[a.asname or a.name] = (f"{node.module}.{a.name}", None)
                elif node.module in MODULES:
                    names[a.asname or a.name] = (node.module, a.name)
    return names


def imports_of(path: Path) -> set[str]:
    """Project modules that ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    found = {module for module, _ in imported_names(tree).values()}
    return found - {module_name(path) if path.is_relative_to(ROOT / PACKAGE) else path.stem}


# ---------------------------------------------------------------- the house


def test_top_level_is_what_a_user_runs():
    assert len(TOP) <= MAX_TOP_FILES, sorted(TOP)
    for name in ("main", "train", "test", "get_datasets", "get_models", "seqMatchNet", "utils"):
        assert name in TOP, name


def test_the_package_imports_nothing_of_the_top_level():
    for name, path in PACKAGE_MODULES.items():
        assert not imports_of(path) & set(TOP), (name, imports_of(path) & set(TOP))
    for name, path in TOP.items():       # the top level is a face of the package
        assert "main" not in imports_of(path), name


def test_no_import_cycles():
    graph = {m: imports_of(p) for m, p in MODULES.items()}
    for extra in [*ROOT.glob("bench/*.py"), *ROOT.glob("assets/*.py")]:
        assert "main" not in imports_of(extra), extra

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
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


def test_the_package_imports_from_anywhere(tmp_path):
    """``import seqmatchnet`` and a ``Localizer`` work from a folder outside the repository, with only
    the installed package (``pip install -e .``, as ``make install`` does) or the package's parent
    folder on the path: no top-level file is needed."""
    script = ("import numpy as np, seqmatchnet\n"
              "from seqmatchnet import Localizer\n"
              "rng = np.random.default_rng(0)\n"
              "db = rng.normal(size=(30, 8)).astype('float32')\n"
              "loc = Localizer(db, seq_len=3)\n"
              "m = [loc.step(db[i] + 0.01) for i in range(10, 14)][-1]\n"
              "print(seqmatchnet.__file__, m.db_frame)\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "" if installed() else str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    where, frame = out.stdout.split()
    assert Path(where).resolve() == (ROOT / PACKAGE / "__init__.py").resolve()
    assert int(frame) == 13
    check = "import sys, seqmatchnet.cli.modes, seqmatchnet.online.localizer; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=120).stdout
    assert not {f"'{top}'" for top in TOP if f"'{top}'" in loaded}, "a top-level file was imported"


def installed() -> bool:
    """Whether this interpreter finds the package outside the repository (``pip install -e .``)."""
    out = subprocess.run([sys.executable, "-c", "import seqmatchnet"], cwd="/", capture_output=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=60)
    return out.returncode == 0


# ---------------------------------------------------------------- the modes


def test_one_mode_table_dispatches_every_mode():
    from seqmatchnet.cli import modes, options

    parser = options.build_parser()
    choices = next(a.choices for a in parser._actions if a.dest == "mode")
    assert tuple(choices) == tuple(modes.MODES)
    import main as main_py

    for name, mode in modes.MODES.items():
        assert mode.name == name and callable(main_py.entry(name)) and mode.help
    main_src = TOP["main"].read_text()
    assert "MODES = " not in main_src and "importlib" not in main_src
    assert not re.search(r"^MODES = ", options.__loader__.get_source(options.__name__), re.M)


def test_every_mode_entry_has_one_signature():
    """``main(argv) -> exit code`` for every mode: main.py dispatches to ``seqmatchnet.cli.<mode>.main``."""
    import inspect

    import main as main_py
    from seqmatchnet.cli import modes

    for name in modes.MODES:
        entry = main_py.entry(name)
        assert entry.__module__ == f"seqmatchnet.cli.{name}" and entry.__name__ == "main", name
        assert list(inspect.signature(entry).parameters) == ["argv"], name


def test_mode_is_read_once_in_main(monkeypatch):
    """``main.py`` reads ``--mode`` and the mode's parser never sees it again."""
    import main as main_py
    from seqmatchnet.cli import compare

    seen = []
    monkeypatch.setattr(compare, "main", lambda argv: seen.append(argv) or 0)
    assert main_py.main(["--mode", "compare", "a", "--b"]) == 0
    assert seen == [["a", "--b"]]


def test_help_shows_every_default(capsys):
    from seqmatchnet.cli.options import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--batchSize", "16"), ("--lr", "0.001"), ("--ckpt", "latest"), ("--negCache", "on"),
                          ("--cacheRefreshRate", "1000"), ("--runsPath", "./data/runs")):
        help_text = re.search(rf" {flag} \S+ (.*?)(?= --[a-zA-Z_-]+ [A-Z{{]|$)", text.split(" options: ", 1)[1])
        assert f"(default: {default})" in help_text.group(1), flag


# ---------------------------------------------------------------- short and narrow


def functions_of(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Top-level functions by name and methods as ``Class.method``."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return out


def all_functions():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def test_functions_are_short():
    """50 lines at most outside tests and benchmarks (the option parser is a list of arguments)."""
    long = [f"{m}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for m, n in all_functions()
            if n.name != "build_parser" and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def parameters(node: ast.FunctionDef) -> list[str]:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_signatures_are_narrow():
    """No function takes more than 8 parameters besides ``self``: what travels together (a database
    side, a query side) travels as one object."""
    wide = [f"{m}.{n.name}: {len(parameters(n))}" for m, n in all_functions()
            if len(parameters(n)) > MAX_PARAMETERS]
    assert not wide, wide


def test_modules_and_lines_are_short():
    long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert not {m: n for m, n in long.items() if n > MAX_MODULE_LINES}
    wide = [f"{m}:{i}" for m, p in MODULES.items() for i, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > MAX_LINE]
    assert not wide, wide[:20]


def test_one_class_per_layer_and_one_rank_check():
    """The traps of two spellings: one ``L2Norm``, one ``Flatten``, one "is this rank 0?"."""
    defined = {}
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                defined.setdefault(node.name, []).append(name)
    for cls in ("L2Norm", "Flatten", "Split", "Localizer", "UserError"):
        assert len(defined.get(cls, [])) == 1, (cls, defined.get(cls))
    for fn in ("_rank", "_main", "rows_of_desc"):
        assert fn not in defined, (fn, defined[fn])


# ---------------------------------------------------------------- where the options travel

# Modules whose functions may take the options namespace: the modes, the two factories (datasets,
# models), the run folder (it stores and restores the options) and the run summary (it records them).
OPTION_READERS = ("seqmatchnet.cli.", "seqmatchnet.data.specs", "seqmatchnet.models.sequence",
                  "seqmatchnet.runs.", "seqmatchnet.evaluation.summary")


def resolve(imports: dict, functions: dict, module: str, func: ast.expr) -> tuple[str, str] | None:
    if isinstance(func, ast.Name):
        if func.id in functions[module]:
            return module, func.id
        target = imports[module].get(func.id)
        if target and target[1]:
            return target if target[1] in functions[target[0]] else (target[0], f"{target[1]}.__init__")
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        owner = func.value.id
        target = imports[module].get(owner)
        if target and target[1] is None:
            return target[0], func.attr
        if owner in {n.split(".")[0] for n in functions[module]}:
            return module, f"{owner}.{func.attr}"
        if target and target[1]:
            return target[0], f"{target[1]}.{func.attr}"
    return None


class OptionsFlow:
    """Follows the options namespace through calls: a function receives it when a call passes a name
    (or an attribute ``x.opt``) that holds it in that function as an argument."""

    def __init__(self) -> None:
        trees = {m: ast.parse(p.read_text()) for m, p in MODULES.items()}
        self.functions = {m: functions_of(t) for m, t in trees.items()}
        self.imports = {m: imported_names(t) for m, t in trees.items()}

    def calls(self, module: str, node: ast.FunctionDef, carrier: str):
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            callee = resolve(self.imports, self.functions, module, call.func)
            if callee is None or callee[1] not in self.functions.get(callee[0], {}):
                continue
            params = [a.arg for a in self.functions[callee[0]][callee[1]].args.args]
            params = params[1:] if params and params[0] in ("self", "cls") else params
            passed = [*enumerate(call.args), *((k.arg, k.value) for k in call.keywords)]
            for where, arg in passed:
                holds = (isinstance(arg, ast.Name) and arg.id == carrier) or (
                    isinstance(arg, ast.Attribute) and arg.attr == "opt")
                target = params[where] if isinstance(where, int) and where < len(params) else where
                if holds and isinstance(target, str):
                    yield callee[0], callee[1], target

    def reached(self, module: str, name: str, param: str = "opt") -> set[tuple[str, str]]:
        seen, todo = set(), [(module, name, param)]
        while todo:
            mod, fn, carrier = todo.pop()
            node = self.functions.get(mod, {}).get(fn)
            if node is None or (mod, fn, carrier) in seen:
                continue
            seen.add((mod, fn, carrier))
            todo.extend(self.calls(mod, node, carrier))
        return {(m, f) for m, f, _ in seen}


def test_options_stop_at_the_mode_files():
    """The options reach the engine only through ``*Config.from_options``: from ``train`` and
    ``run_test`` they enter only the modes, the factories and the run folder, at most 10 and 8
    modules; no engine function takes them."""
    flow = OptionsFlow()
    reached = flow.reached("seqmatchnet.cli.train", "train"), flow.reached("seqmatchnet.cli.test", "run_test")
    for functions in reached:
        engine = [(m, f) for m, f in functions if not (m.startswith(OPTION_READERS) or f.endswith("from_options"))]
        assert not engine, engine
    from_train, from_test = ({m for m, _ in functions} for functions in reached)
    assert "seqmatchnet.cli.test" not in from_train
    assert len(from_train) <= 10, sorted(from_train)
    assert len(from_test) <= 8, sorted(from_test)
    for module, functions in flow.functions.items():
        if module in TOP or module.startswith(OPTION_READERS) or module == "seqmatchnet.data.own":
            continue
        for name, node in functions.items():
            params = {a.arg for a in node.args.args + node.args.kwonlyargs}
            if "opt" in params or "options" in params:
                assert name.endswith("from_options"), f"{module}.{name} takes the options"


def test_train_does_not_import_the_test_mode():
    assert "seqmatchnet.cli.test" not in imports_of(PACKAGE_MODULES["seqmatchnet.cli.train"])
    assert len(PACKAGE_MODULES["seqmatchnet.cli.test"].read_text().splitlines()) <= 200


def test_options_read_directly_outside_options_and_prepare():
    """``getattr(opt, name, default)`` restates a default away from the parser: only the parser
    module and prepare (whose namespace is its own) may do it."""
    found = []
    for name, path in MODULES.items():
        if name in ("seqmatchnet.cli.options", "seqmatchnet.cli.prepare", "seqmatchnet.data.own"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and len(node.args) == 3 and isinstance(node.args[0], ast.Name) and node.args[0].id == "opt"):
                found.append(f"{name}:{node.lineno}")
    assert not found, found
