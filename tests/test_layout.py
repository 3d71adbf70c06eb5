"""The package's import structure: no cycles (lazy imports included), no import of the
repository's benchmarks, no sys.path edits, and a registry entry for every method module."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastipirm"
# the installed package: fastipirm/ and the top-level kernels/ folder as fastipirm.kernels
FOLDERS = {PACKAGE: "fastipirm", ROOT / "kernels": "fastipirm.kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, prefix in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = [prefix, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every fastipirm module that importing ``name`` may execute, from every import statement
    in the file (top level or inside functions): the target and its packages' ``__init__``
    (except packages that contain ``name`` itself, which are already executing)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[:len(base) - node.level + 1]
                mod = ".".join(root + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                targets.add(sub if sub in modules else mod)
    own = set(_ancestors(name)) | ({name} if is_package else set())
    out = set()
    for t in targets:
        if t in modules or t.startswith("fastipirm."):
            for m in [t, *_ancestors(t)]:
                if m in modules and m not in own and m != name:
                    out.add(m)
    return out


def test_no_import_cycle_inside_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # Tarjan's strongly connected components
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
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


def test_the_checker_sees_a_lazy_cycle(tmp_path, monkeypatch):
    """The cycle test is not vacuous: a function-level import back into a module is found."""
    modules = {"fastipirm.a": tmp_path / "a.py", "fastipirm.b": tmp_path / "b.py"}
    modules["fastipirm.a"].write_text("from . import b\n")
    modules["fastipirm.b"].write_text("def f():\n    from .a import x\n")
    assert _imports("fastipirm.b", modules["fastipirm.b"], modules) == {"fastipirm.a"}
    assert _imports("fastipirm.a", modules["fastipirm.a"], modules) == {"fastipirm.b"}


def test_package_never_imports_bench_nor_edits_sys_path():
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ("bench", "kernels", "tests")
                               for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and not node.level:
                assert node.module.split(".")[0] not in ("bench", "kernels", "tests"), path
            elif isinstance(node, ast.Attribute) and node.attr == "path":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), path


def test_every_method_module_is_registered():
    from fastipirm.methods import METHODS, Method
    names = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__", "base"}
    assert names == set(METHODS)
    assert all(issubclass(m, Method) and m.name == name for name, m in METHODS.items())
