"""`platform` is a standard-library module that torch, mlflow, ray and uuid
import; the repo's `platform/` folder must never shadow it (docs/architecture.md). The
checks run from the repo root, where `python -c` puts the folder on sys.path."""
from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "platform" / "comod_platform"
COMMANDS = {"cli", "cli_search"}
"""The command layer (comod_platform's docstring): the only modules that may import cli_search."""


def python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_platform_folder_is_not_a_package():
    assert (REPO / "platform" / "comod_platform" / "__init__.py").is_file()
    assert not (REPO / "platform" / "__init__.py").exists()
    assert not (REPO / "platform.py").exists()
    assert not (REPO / "tests" / "platform").exists()


def test_stdlib_platform_wins_from_the_repo_root():
    proc = python("import platform; print(platform.system()); print(platform.__file__)")
    assert proc.returncode == 0, proc.stderr
    system, origin = proc.stdout.split("\n")[:2]
    assert system == platform.system() and system
    assert not Path(origin).resolve().is_relative_to(REPO), origin


def test_platform_and_its_dependencies_import_from_the_repo_root():
    proc = python("import platform, uuid, comod_platform, torch, mlflow; "
                  "print(platform.system(), uuid.uuid4().version, comod_platform.__file__)")
    assert proc.returncode == 0, proc.stderr
    system, version, origin = proc.stdout.split()
    assert system == platform.system() and version == "4"
    assert Path(origin) == REPO / "platform" / "comod_platform" / "__init__.py"


def test_command_line_and_search_file_load_without_torch_ray_or_mlflow():
    """A search starts Ray while a second thread imports torch and MLflow: nothing the driver imports
    before that may pull them in (nor may `import comod.config`), or the two would run one after the other."""
    proc = python("import sys, comod, comod.config, comod_platform.cli, comod_platform.cli_search, "
                  "comod_platform.runner, comod_platform.searchfile; "
                  "print(' '.join(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules) or '-')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["-"], proc.stdout


def test_comod_public_api_loads_on_first_use():
    proc = python("import sys, comod; assert 'torch' not in sys.modules; "
                  "from comod import load_config, run_experiment, SITES; "
                  "assert 'torch' in sys.modules and callable(run_experiment) and 'layer2' in SITES; "
                  "assert set(comod.__all__) <= set(dir(comod)); "
                  "missing = [n for n in comod.__all__ if getattr(comod, n, None) is None]; assert not missing, missing\n"
                  "try:\n    comod.no_such_name\nexcept AttributeError as err:\n    print(err)")
    assert proc.returncode == 0, proc.stderr
    assert "no attribute 'no_such_name'" in proc.stdout


def test_version_is_the_installed_package_version():
    import subprocess
    import sys
    from importlib.metadata import version
    from pathlib import Path

    comod = Path(sys.executable).parent / "comod"
    done = subprocess.run([str(comod), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"comod {version('comod')}"


def imports_of(source: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` (comod_platform's) that ``source`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("comod_platform.")}
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] != "comod_platform":
                continue
            inner = parts[1:] if node.level == 0 else [p for p in parts if p]
            found |= {inner[0]} if inner else {a.name for a in node.names}
    return found & modules


def package_imports() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: imports_of(p.read_text(), modules) - {p.stem} for p in sorted(PACKAGE.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (``[a, b, ..., a]``), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    return next((c for m in sorted(graph) if m not in state for c in [visit(m)] if c), None)


def test_import_checks_see_local_and_relative_imports_and_circles():
    modules = {"cli", "runner", "storage", "writer"}
    source = ("from comod_platform.runner import run_search\nimport comod_platform.writer\n"
              "def f():\n    from comod_platform import storage as s, nothing\n    from .cli import main\n"
              "from comod.config import flatten\nimport json\n")
    assert imports_of(source, modules) == {"runner", "writer", "storage", "cli"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_platform_imports_run_one_way():
    """Commands -> operations -> machinery -> leaves -> comod, as comod_platform's docstring draws it."""
    graph = package_imports()
    assert COMMANDS | {"runner", "conventions", "tracking"} <= set(graph), sorted(graph)
    assert graph["cli"] >= {"cli_search"} and graph["cli_search"] >= {"runner"}, graph  # the parse sees imports
    cycle = find_cycle(graph)
    assert cycle is None, f"an import circle: {' -> '.join(cycle)}"
    importers = {target: sorted(m for m, deps in graph.items() if target in deps) for target in COMMANDS}
    assert importers["cli"] == [], f"only the console script imports cli, not {importers['cli']}"
    assert set(importers["cli_search"]) <= COMMANDS, \
        f"modules below the command layer import cli_search: {sorted(set(importers['cli_search']) - COMMANDS)}"


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest chain of imports (``[a, b, ...]``: a imports b ...) of an acyclic graph."""
    memo: dict[str, list[str]] = {}

    def chain(module: str) -> list[str]:
        if module not in memo:
            memo[module] = [module] + max((chain(d) for d in sorted(graph.get(module, ()))), key=len, default=[])
        return memo[module]

    return max((chain(m) for m in sorted(graph)), key=len, default=[])


def test_the_import_chain_is_at_most_eight_modules_deep():
    assert longest_chain({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == ["a", "b", "c"]
    chain = longest_chain(package_imports())
    assert len(chain) <= 8, f"imports {len(chain)} modules deep: {' -> '.join(chain)}"


def test_a_search_driver_on_synthetic_data_does_not_import_torchvision():
    """The driver parses the search, loads the base experiment's data and builds the trainable without
    torchvision (about 1.5 s of its start-up, with torch._dynamo); the trials import it, to build models."""
    proc = python("import sys\n"
                  "from comod_platform import runner, trainable, searchfile, tune_callbacks, searcher\n"
                  "from comod.data import load_data\n"
                  "sf = searchfile.load_search('search_spaces/tiny.yaml')\n"
                  "data = trainable.pack(load_data(sf.base_config()))\n"
                  "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'comod')))")
    assert proc.returncode == 0, proc.stderr
    modules = proc.stdout.strip()
    assert "torchvision" not in modules and "comod.data.synthetic" in modules, modules
    assert "'comod.train'" not in modules and "'comod.model'" not in modules, modules
