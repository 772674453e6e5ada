"""The package's shape, checked (issue 21): library modules live in role folders and tests/ mirrors them, no
file over 400 lines, no class over 250, no import circle (imports inside functions and under TYPE_CHECKING
included), and the runner depends on the library, never the reverse."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fop_asdl"
ROLE_FOLDERS = {"engine", "curvature", "methods", "distributed", "optim", "diagnostics", "models", "data", "cli"}
TOP_LEVEL = {"__init__.py", "__main__.py", "registry.py", "compat.py"}
MAX_FILE_LINES, MAX_CLASS_LINES = 400, 250
TESTS = Path(__file__).resolve().parent
#: What stands at the root of tests/: the fixtures, the shared helpers and the package-wide tests.
TEST_ROOT = {"conftest.py", "scaffold.py", "dense_refs.py", "test_layout.py", "test_interface.py", "test_compat.py",
             "test_asdl_contract.py"}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ".".join(("fop_asdl",) + path.relative_to(PACKAGE).with_suffix("").parts).replace(".__init__", "")


def imported(path: Path, name: str):
    """Every fop_asdl module this file imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = {n for _, n in modules()}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # "from . import x" names a module
                if f"{target}.{alias.name}" in known:
                    yield f"{target}.{alias.name}"
                elif target in known:
                    yield target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name


def test_library_modules_live_in_role_folders():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in TOP_LEVEL]
    assert not loose, f"modules outside a role folder: {loose}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert folders <= ROLE_FOLDERS, folders - ROLE_FOLDERS
    for folder in folders:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc, f"{folder}/__init__.py says nothing about what belongs there"
    # tests/ mirrors them: a test file sits in the folder named after what it tests (scripts/ for the scripts),
    # and the test folders are no packages (pytest imports their files by name: each name once)
    files = sorted(p.relative_to(TESTS) for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)
    loose = [str(f) for f in files if len(f.parts) == 1 and f.name not in TEST_ROOT]
    assert not loose, f"at the root of tests/ only {sorted(TEST_ROOT)}, not {loose}"
    misplaced = [str(f) for f in files if len(f.parts) > 1 and (len(f.parts) > 2 or f.parts[0] not in
                                                               ROLE_FOLDERS | {"scripts"})]
    assert not misplaced, f"test files outside a folder named after a library folder: {misplaced}"
    names = [f.name for f in files if f.name != "conftest.py"]
    assert "__init__.py" not in names and len(names) == len(set(names)), \
        sorted({n for n in names if names.count(n) > 1 or n == "__init__.py"})
    for folder in {f.parts[0] for f in files if len(f.parts) > 1}:
        assert list((TESTS / folder).glob("test_*.py")), f"tests/{folder} holds no tests"


@pytest.mark.parametrize("path", [p for p, _ in modules()], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_classes_stay_small(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_FILE_LINES, f"{lines} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"class {node.name}: {size} lines"


def test_no_import_circle():
    graph = {name: set(imported(path, name)) - {name} for path, name in modules()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_runner_depends_on_the_library_never_the_reverse():
    for path, name in modules():
        if not name.startswith("fop_asdl.cli") and name != "fop_asdl.__main__":  # `python -m fop_asdl` runs it
            runner = [m for m in imported(path, name) if m.startswith("fop_asdl.cli")]
            assert not runner, f"{name} imports the runner: {runner}"
