"""The repository's imports point one way, down from the scripts to the core (README, "Files"): every import of
every source file, the lazy ones inside functions included, forms no circle."""
import ast
import subprocess
import sys

from conftest import ROOT

SOURCES = sorted([*ROOT.glob("*.py"), ROOT / "data" / "prepare.py", *ROOT.glob("study/*.py")])


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imports(path, names):
    """The repository modules a file imports anywhere in it (a top-level, lazy or `from x import y` import)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found & names


def cycle(graph):
    """A circle of the graph (module -> modules it imports) as a list of modules, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = "done"
        return None
    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


def test_cycle_finds_a_circle_by_hand():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_in_the_repository():
    names = {module_name(p) for p in SOURCES}
    graph = {module_name(p): imports(p, names) - {module_name(p)} for p in SOURCES}
    assert graph["evaluate"] >= {"model", "quantize", "report"}  # the walk sees the imports it is meant to
    assert "pretrained" in graph["train"]  # a lazy import, inside a function
    assert cycle(graph) is None, f"import circle: {' -> '.join(cycle(graph))}"


def test_model_imports_nothing_else_from_the_repository():
    names = sorted(module_name(p) for p in SOURCES)
    code = f"import sys, model; print(sorted(set(sys.modules) & set({names!r})))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "['model']"
