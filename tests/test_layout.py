"""The layout a reader relies on: the import graph of the top-level files is a DAG (each file can be read after
the files it imports), runtime files never import transformers, and the README's reading order states true line
counts."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports(module: str) -> set:
    """Top-level project modules `module` imports anywhere in the file (function-level imports included)."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def find_cycle(graph: dict) -> list:
    """A cycle of the directed graph as a list of nodes, or [] (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return []

    for n in graph:
        if n not in state and (cycle := visit(n)):
            return cycle
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_import_graph_is_a_dag():
    graph = {m: imports(m) & set(MODULES) - {m} for m in MODULES}
    assert "model" in graph and "checkpoint" in graph["model"]
    assert find_cycle(graph) == []


def test_the_recipe_never_imports_tools():
    assert [m for m in MODULES if "tools" in imports(m)] == []


def test_runtime_code_never_imports_transformers():
    assert [m for m in MODULES if "transformers" in imports(m)] == []


def test_readme_line_counts_are_true():
    """Rows of the README's reading order: `| [file.py](file.py) | N | ...`: N must be the file's line count."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| \[([\w/.]+\.py)\]\([\w/.]+\) \| (\d+) \|", readme, re.M)
    assert len(rows) >= 10, "the README lists the files to read, with line counts"
    wrong = {f: (int(n), sum(1 for _ in open(os.path.join(ROOT, f)))) for f, n in rows
             if int(n) != sum(1 for _ in open(os.path.join(ROOT, f)))}
    assert not wrong, f"README line counts (stated, actual): {wrong}"
