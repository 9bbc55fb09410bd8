"""The house rules of docs/architecture.md, checked on the package code: the import-linter contracts of
pyproject.toml (layers pointing down, independent jobs), no import cycle between files, no function over
100 lines or with more than 10 parameters, imports at module top."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sharding", "model", "train", "serve", "convert", "planner")
MAX_LINES, MAX_PARAMS = 100, 10
# Imports that may stay inside a function, each for a reason given where it stands: optional heavy
# dependencies and the compile-only TPU machinery.
DEFERRED_OK = {"tensorboardX", "uvicorn", "wandb", "jax._src", "jax.experimental.topologies"}


def _modules():
    """{dotted module name: parsed file} for every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = (path, ast.parse(path.read_text(), str(path)))
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _imports(name: str, tree: ast.Module, path: Path) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(filter(None, (_resolve(a.name) for a in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                target = _resolve(f"{base}.{a.name}") or _resolve(base)
                if target:
                    out.add(target)
    out.discard(name)
    return out


def test_import_linter_contracts_hold():
    """lint-imports (import-linter) with the contracts of pyproject.toml; a later change that imports
    upward or across jobs fails here and in .ci/run."""
    r = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                        "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout and r.stdout.count("KEPT") >= 3


def test_no_import_cycle_between_files():
    graph = {name: _imports(name, tree, path) for name, (path, tree) in MODULES.items()}
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _functions():
    for name, (path, tree) in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def test_functions_are_short_and_narrow():
    long = [(where, n.end_lineno - n.lineno + 1) for where, n in _functions() if n.end_lineno - n.lineno + 1 > MAX_LINES]
    wide = []
    for where, n in _functions():
        a = n.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
        if len(names) > MAX_PARAMS:
            wide.append((where, len(names)))
    assert not long, f"functions over {MAX_LINES} lines: {long}"
    assert not wide, f"functions with over {MAX_PARAMS} parameters: {wide}"


def test_imports_at_module_top():
    """Inside a function only an optional heavy dependency may be imported (DEFERRED_OK), or anything in a
    job's `__main__` entry point (fast --help)."""
    inside = []
    for where, fn in _functions():
        if where.split(":")[0].endswith("__main__.py"):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if not all(any(n == ok or n.startswith(ok + ".") for ok in DEFERRED_OK) for n in names):
                inside.append(f"{where}: {ast.unparse(node)}")
    assert not inside, "imports inside functions:\n" + "\n".join(inside)


@pytest.mark.parametrize("bad", ["model.network.layers imports model.formats.load",
                                 "serve.engine imports train.step"])
def test_contracts_catch_an_upward_or_sideways_import(bad, tmp_path):
    """The contracts are not vacuous: a copy of the tree with one bad import breaks them."""
    src, _, dst = bad.partition(" imports ")
    copy = tmp_path
    subprocess.run(["cp", "-r", *(str(ROOT / p) for p in (*PACKAGES, "pyproject.toml")), str(copy)], check=True)
    f = copy.joinpath(*src.split(".")).with_suffix(".py")
    f.write_text(f.read_text() + f"\nimport {dst}  # noqa\n")
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); "
                        "from importlinter.cli import lint_imports_command; lint_imports_command()"],
                       cwd=copy, capture_output=True, text=True)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout[-2000:]
