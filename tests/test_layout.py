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


RECIPE = ("grpo", "sft", "entropy", "generate", "eval")


def long_functions(module: str, max_lines: int = 50, max_required: int = 6) -> list:
    """Functions of a recipe file over max_lines lines or with more than max_required parameters without a default
    (self/cls not counted)."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = [a.arg for a in node.args.posonlyargs + node.args.args][:len(node.args.posonlyargs + node.args.args)
                                                                          - len(node.args.defaults)]
            required = [a for a in args if a not in ("self", "cls")] + [
                a.arg for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is None]
            lines = node.end_lineno - node.lineno + 1
            if lines > max_lines or len(required) > max_required:
                out.append(f"{module}.{node.name}: {lines} lines, {len(required)} required parameters")
    return out


def test_recipe_functions_are_short():
    assert long_functions.__doc__ and [m for m in RECIPE if m in MODULES]
    assert [f for m in RECIPE if m in MODULES for f in long_functions(m)] == []


def test_long_functions_finds_them(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path), raising=False)
    body = "\n".join(f"    x{i} = {i}" for i in range(55))
    (tmp_path / "fake.py").write_text(f"def f(a, b, c, d, e, f, g, h=1):\n    pass\n\n\ndef g():\n{body}\n")
    found = long_functions("fake")
    assert found == ["fake.f: 2 lines, 7 required parameters", "fake.g: 56 lines, 0 required parameters"]


def test_readme_reading_order_follows_the_import_graph():
    """Each file of the README's reading order comes after every project file it imports, and every top-level file
    is listed: the order is one a reader can follow without looking ahead."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    order = [f[:-3] for f in re.findall(r"^\| \[(\w+\.py)\]\(\w+\.py\) \| \d+ \|", readme, re.M)]
    assert sorted(order) == MODULES, set(MODULES) ^ set(order)
    seen = set()
    for m in order:
        assert imports(m) & set(MODULES) - {m} <= seen, f"{m} is listed before {imports(m) & set(MODULES) - seen}"
        seen.add(m)
