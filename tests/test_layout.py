"""The layout: the top-level names VI-ReID users know from the AGW/DDAG authors' code are
there, no module imports another that (directly or through others) imports it back, and
no product code imports the tests."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BRIEF = ("train.py", "pre_process_sysu.py", "model.py", "loss.py", "data_loader.py", "data_manager.py",
         "eval_metrics.py", "utils.py", "AGW", "DDAG", "save_model", "log", "requirements.txt", "README.md")
# product code: every folder whose modules import each other by bare name (sys.path holds the
# repository root, and a script's own folder when it runs)
FOLDERS = (".", "AGW", "DDAG", "tools", "bench")


def test_the_authors_top_level_names_are_there():
    assert [n for n in BRIEF if not (ROOT / n).exists()] == []


def imports(path):
    """Every module name ``path`` imports, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def graph():
    """{module: the repository modules it imports}: a script's own folder first, then the root."""
    mods = {}
    for folder in FOLDERS:
        for f in sorted((ROOT / folder).glob("*.py")):
            mods[(folder, f.stem)] = f
    edges = {}
    for (folder, name), f in mods.items():
        out = set()
        for imp in imports(f):
            for key in ((folder, imp), (".", imp)):
                if key in mods and key != (folder, name):
                    out.add(key)
                    break
        edges[(folder, name)] = out
    return edges


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == [], " ; ".join(" -> ".join(f"{d}/{m}" for d, m in c) for c in cycles)


def test_a_cycle_would_be_found(tmp_path, monkeypatch):
    """The check itself: two modules importing each other are reported."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "FOLDERS", (".",))
    edges = graph()
    assert edges[(".", "a")] == {(".", "b")} and edges[(".", "b")] == {(".", "a")}


def test_product_code_does_not_import_the_tests():
    """(DDAG/test_ddag.py is the authors' test script, a product module: its folder's names win.)"""
    tests = {f.stem for f in (ROOT / "tests").glob("*.py")} | {"tests"}
    offenders = {}
    for d in FOLDERS:
        own = {f.stem for f in (ROOT / d).glob("*.py")} | {f.stem for f in ROOT.glob("*.py")}
        for f in (ROOT / d).glob("*.py"):
            bad = sorted((imports(f) & tests) - own)
            if bad:
                offenders[f"{d}/{f.stem}"] = bad
    assert offenders == {}


def test_the_longest_first_order_names_test_files_that_exist():
    """conftest.LONGEST_FIRST starts the long files first; a renamed file would drop out of it
    silently and run last again."""
    from conftest import LONGEST_FIRST
    assert [n for n in LONGEST_FIRST if not (ROOT / "tests" / n).is_file()] == []
