"""Packaging that holds: every third-party package the code imports is declared in pyproject.toml (a
module-level import in `dependencies`, a deferred one there or in an extra), jax/jaxlib/flax/orbax are
bounded to the versions tested, and the CPU-kernel cache never loads a library built for another CPU."""

import ast
import importlib.metadata as md
import logging
import re
import sys
import tomllib
from pathlib import Path

import jax
import pytest
from packaging.requirements import Requirement

from model.network.backends import cpu_kernels

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "sharding", "train", "serve", "convert", "planner")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports() -> dict[str, dict[str, list[str]]]:
    """{"module" | "deferred": {top-level import name: [files]}} over the installable packages."""
    found: dict[str, dict[str, list[str]]] = {"module": {}, "deferred": {}}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(f.read_text())
            top = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                where = "module" if id(node) in top or f.name == "__main__.py" else "deferred"
                for name in names:
                    root = name.split(".")[0]
                    if root not in sys.stdlib_module_names and root not in PACKAGES and root != "__future__":
                        found[where].setdefault(root, []).append(str(f.relative_to(ROOT)))
    return found


def _declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {_norm(Requirement(r).name): Requirement(r) for r in project["dependencies"]}
    extras = {_norm(Requirement(r).name) for reqs in project["optional-dependencies"].values() for r in reqs}
    return deps, extras


def test_every_imported_package_is_declared():
    deps, extras = _declared()
    dist_of = md.packages_distributions()
    imports = _third_party_imports()
    assert {"jax", "numpy", "ml_dtypes", "etils", "tensorstore", "pydantic"} <= set(imports["module"])  # the scan works
    for where, names in imports.items():
        for name, files in names.items():
            dists = {_norm(d) for d in dist_of.get(name, [name])}
            ok = dists & (set(deps) if where == "module" else set(deps) | extras)
            assert ok, (f"{files[0]} imports {name!r} (distribution {', '.join(sorted(dists))}), which pyproject.toml "
                        f"does not declare{' in dependencies' if where == 'module' else ''}")


@pytest.mark.parametrize("name", ["jax", "jaxlib", "flax", "orbax-checkpoint"])
def test_core_libraries_bounded_to_the_tested_versions(name):
    deps, _ = _declared()
    spec = deps[name].specifier
    assert any(s.operator == "<" for s in spec), f"{name}: no upper bound in {spec}"
    assert spec.contains(md.version(name)), f"the installed {name} {md.version(name)} is outside {spec}"
    lower = min(s.version for s in spec if s.operator == ">=")
    assert lower.split(".")[:2] == md.version(name).split(".")[:2], f"{name}: {spec} admits untested minors below"


# ---------------------------------------------------------------------------------------------
# The CPU-kernel cache

@pytest.fixture
def fake_builds(tmp_path, monkeypatch):
    """The kernel cache in tmp_path; compiles recorded and faked (the real build: tests/test_serve_engine.py)."""
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "cache"))
    commands = []

    def fake_compile(cmd):
        out = cmd[cmd.index("-o") + 1]
        Path(out).write_bytes(f"built for {cpu_kernels._cpu_features()}".encode())
        commands.append(cmd)

    monkeypatch.setattr(cpu_kernels, "_compile", fake_compile)
    return commands


def test_library_built_for_another_cpu_is_rebuilt_not_loaded(fake_builds, monkeypatch):
    """A cache shared across hosts (NFS home, container image) holds a library built with -march=native on
    another CPU: loading it on this one could die with SIGILL."""
    monkeypatch.setattr(cpu_kernels, "_cpu_features", lambda: "fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni")
    newer = cpu_kernels.build()
    assert len(fake_builds) == 1
    monkeypatch.setattr(cpu_kernels, "_cpu_features", lambda: "fpu sse2 avx2")  # an older CPU, same cache
    older = cpu_kernels.build()
    assert len(fake_builds) == 2 and older != newer  # built anew, for this CPU
    assert older.read_bytes() == b"built for fpu sse2 avx2"
    assert newer.read_bytes().endswith(b"avx512_vnni")  # the other host's library is left alone
    assert cpu_kernels.build() == older and len(fake_builds) == 2  # and this CPU's is reused
    assert f"-I{jax.ffi.include_dir()}" in fake_builds[0]  # built against jax's own FFI headers


def test_no_compiler_is_one_warning_with_its_cost(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ here
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert not cpu_kernels.available()
        assert not cpu_kernels.available()  # decided once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "no C++ compiler" in warnings[0] and "slower" in warnings[0] and "g++" in warnings[0], warnings[0]
