"""Packaging and the import structure of the ops layer.

* Only ``fastipirm`` is installed: the repository's ``kernels/`` folder is importable as
  ``fastipirm.kernels`` and not as a top-level ``kernels`` (nor ``bench`` or ``tests``), in the
  editable install these tests run in and in a regular wheel (built from a copy of the sources).
* ``fastipirm.ops`` and ``fastipirm.kernels`` import nothing from the rest of fastipirm, the
  kernels nothing from the ops layer, and their modules form no import cycle, counting
  function-level imports and the implicit import of a parent package's ``__init__``.
"""
import ast
import graphlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, **env_extra) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter of this environment, from ``cwd``, without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


_IMPORTS = r"""
import importlib, sys
root = sys.argv[1] if len(sys.argv) > 1 else None
for name in ("kernels", "bench", "tests"):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f"top-level {name!r} is importable: {sys.modules[name]!r}")
import fastipirm.kernels
import fastipirm.kernels.utils
if importlib.util.find_spec("triton") is not None:
    import fastipirm.kernels.env_contrastive
print(fastipirm.kernels.__file__)
"""


def test_only_fastipirm_is_importable_from_outside_the_repository(tmp_path):
    proc = _python(_IMPORTS, tmp_path, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the editable install must not have put the repository root on sys.path (a .pth file)
    proc = _python("import sys; print('\\n'.join(sys.path))", tmp_path)
    assert str(ROOT) not in [str(Path(p).resolve()) for p in proc.stdout.splitlines() if p]


def _copy_sources(dest: Path) -> Path:
    """What a wheel is built from: the build files and the packages' sources (no build
    products, no caches)."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "*.egg-info", "build")
    for name in ("fastipirm", "kernels", "csrc"):
        shutil.copytree(ROOT / name, dest / name, ignore=skip)
    return dest


def test_wheel_holds_only_fastipirm_with_the_kernels_inside(tmp_path):
    """A regular wheel (without the C++ extension): top-level entries ``fastipirm`` and its
    dist-info only, every package of the source tree in it, ``kernels/`` as
    ``fastipirm/kernels``; installed, it imports the same way."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed")
    (tmp_path / "src").mkdir()
    src = _copy_sources(tmp_path / "src")
    out = tmp_path / "wheel"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FASTIPIRM_NO_EXT"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", str(src), "-w", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("fastipirm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"fastipirm", next(t for t in top if t.endswith(".dist-info"))}, top
    assert "fastipirm/kernels/env_contrastive.py" in names
    assert "fastipirm/kernels/__init__.py" in names
    packages = {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("fastipirm/**/__init__.py")}
    packages |= {"fastipirm/" + str(p.parent.relative_to(ROOT))
                 for p in ROOT.glob("kernels/**/__init__.py")}
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"packages missing from the wheel: {missing}"

    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                           "-q", "--target", str(site), str(wheel)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _python(_IMPORTS, tmp_path, PYTHONPATH=str(site), TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Path(proc.stdout.split()[-1]).resolve() == site / "fastipirm/kernels/__init__.py"


# ------------------------------------------------------------------ import structure (no install)
def _modules() -> dict[str, Path]:
    """Module name -> file of every module of the fastipirm package, ``kernels/`` mapped to
    ``fastipirm.kernels``."""
    mods = {}
    for base, prefix in ((ROOT / "fastipirm", "fastipirm"),
                         (ROOT / "kernels", "fastipirm.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


def _imports(name: str, path: Path, modules) -> set[str]:
    """Every fastipirm module ``name`` imports, at any level of the file (function-level imports
    too), with the parent packages such an import initialises first (those that do not already
    contain ``name``)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    edges = set()
    for target in targets:
        if target.split(".")[0] == "kernels":
            edges.add(target)                # the top-level name: reported by the test
            continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in modules and mod != name and not name.startswith(mod + "."):
                edges.add(mod)
    return edges


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> bool:
    return name.startswith(("fastipirm.ops", "fastipirm.kernels"))


def test_ops_and_kernels_import_only_each_other_and_the_kernels_no_ops():
    graph = _graph()
    for name, targets in graph.items():
        if not _layer(name):
            continue
        outside = sorted(t for t in targets if t != "fastipirm" and not _layer(t))
        assert not outside, f"{name} imports {outside} (the ops layer imports no other fastipirm)"
        if name.startswith("fastipirm.kernels"):
            ops = sorted(t for t in targets if t.startswith("fastipirm.ops"))
            assert not ops, f"{name} imports {ops}: the kernels are a leaf"


def test_nothing_imports_the_top_level_kernels_name():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "kernels")
                 for name, targets in _graph().items()}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycle_in_the_ops_layer():
    graph = {name: {t for t in targets if _layer(t)} for name, targets in _graph().items()
             if _layer(name)}
    assert "fastipirm.kernels.utils" in graph["fastipirm.ops.backends"]   # the graph is real
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_cycle_check_sees_the_old_kernels_cycle():
    """Not vacuous: kernels importing the glue (whose package imports the registry, which
    imports the kernels lazily) is a cycle."""
    graph = {name: {t for t in targets if _layer(t)} for name, targets in _graph().items()
             if _layer(name)}
    graph["fastipirm.kernels.env_contrastive"].add("fastipirm.ops")
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(graph).prepare()
