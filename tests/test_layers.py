"""The layers, read statically from the source (every import statement, at module level or inside a function):
a layer imports only the layers below it, and no module imports itself back through others (no cycles).

From the bottom: the run-time helpers (``are_fast.runtime``); the Triton kernels (top-level ``kernels/``, installed
as ``are_fast.kernels``); the ops; the model; training and encoding (side by side, apart); the toy main job and
the tools; the command line; the package root (the public names, ``python -m are_fast``)."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RANK = {"runtime": 0, "kernels": 1, "ops": 2, "model": 3, "training": 4, "encoding": 4, "toy": 5, "tools": 5,
        "cli": 6, "": 7}  # "": the package root (__init__, __main__)


def module_files(repo: Path) -> dict:
    """{dotted module name: path} of the package ``are_fast`` and the kernels folder (``are_fast.kernels.*``)."""
    files = {}
    for path in sorted((repo / "are_fast").rglob("*.py")):
        parts = path.relative_to(repo).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((repo / "kernels").glob("*.py")):
        files[f"are_fast.kernels.{path.stem}"] = path
    return files


def imports_of(name: str, path: Path, known, repo: Path) -> set:
    """The modules of the package that the file imports anywhere in it (a package's ``__init__`` counts as the
    package; ``from package import submodule`` as the submodule); an import of a module that does not exist
    stays as its name (not in ``known``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if path.parent == repo / "kernels":  # the top-level folder, a subpackage installed
        package = "are_fast.kernels"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "are_fast" and target != name:
                found.add(target)
    return found


def import_graph(repo: Path) -> dict:
    """{module: set of the package's modules it imports}."""
    files = module_files(repo)
    return {name: imports_of(name, path, files, repo) for name, path in files.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return ""
    return parts[1]


def upward_imports(graph: dict) -> list:
    """'a -> b' for each import of a layer that is not below the importer's (same layer: allowed; training and
    encoding, or toy and tools: side by side, so not)."""
    bad = []
    for source, targets in graph.items():
        for target in sorted(targets):
            here, there = layer(source), layer(target)
            if here != there and RANK[there] >= RANK[here]:
                bad.append(f"{source} ({here or 'root'}) -> {target} ({there or 'root'})")
    return bad


def import_cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO)


def test_every_module_has_a_layer(graph):
    assert {layer(m) for m in graph} <= set(RANK), sorted({layer(m) for m in graph} - set(RANK))
    assert {"are_fast.ops.functional", "are_fast.kernels.kl_epilogue", "are_fast.cli.encode"} <= set(graph)


def test_every_import_names_a_module_of_the_package(graph):
    """A relative import that a move left behind (inside a function, where only a run would find it) fails here."""
    assert {f"{m} -> {t}" for m, targets in graph.items() for t in targets if t not in graph} == set()


def test_no_layer_imports_a_higher_one(graph):
    assert upward_imports(graph) == []


def test_no_import_cycles(graph):
    assert import_cycles(graph) == []


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    """The same checks on a copy of the package with a bad import added where it would hide: inside a function
    of a lower layer (ops -> training, a cycle through training's imports of the ops) and in a kernel."""
    for path in list(REPO.glob("are_fast/**/*.py")) + list(REPO.glob("kernels/*.py")):
        copy = tmp_path / path.relative_to(REPO)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    functional = tmp_path / "are_fast" / "ops" / "functional.py"
    functional.write_text(functional.read_text() + "\n\ndef _bad():\n    from ..training.trainer import Trainer\n")
    kernel = next((tmp_path / "kernels").glob("*.py"))
    kernel.write_text(kernel.read_text() + "\nfrom are_fast.model import layout\n")
    job = tmp_path / "are_fast" / "toy" / "job.py"
    job.write_text(job.read_text() + "\n\ndef _moved():\n    from .trainer import Trainer\n")
    graph = import_graph(tmp_path)
    assert "are_fast.toy.trainer" in graph["are_fast.toy.job"] and "are_fast.toy.trainer" not in graph
    bad = upward_imports(graph)
    assert "are_fast.ops.functional (ops) -> are_fast.training.trainer (training)" in bad
    assert f"are_fast.kernels.{kernel.stem} (kernels) -> are_fast.model.layout (model)" in bad
    assert any({"are_fast.ops.functional", "are_fast.training.trainer"} <= set(c) for c in import_cycles(graph))


def test_setup_installs_every_subpackage():
    """A new layer folder must be listed in setup.py's packages, or the wheel ships without it."""
    listed = set(re.findall(r'"(are_fast(?:\.\w+)*)"', (REPO / "setup.py").read_text()))
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "are_fast").rglob("__init__.py")}
    assert folders <= listed, sorted(folders - listed)
