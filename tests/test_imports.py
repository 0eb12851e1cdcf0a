"""The import graph of `specdec/*.py` (read with `ast`, nothing imported): no circles, and the lower floors never
name the modules above them (test doubles, the spec language, the harness, the reports, the CLI)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "specdec"
LOWER = ["models", "net", "sampling", "stats", "timing", "kernels", "engine", "policies", "drafters", "suffix", "controllers",
         "costmodel", "decode", "vocab", "unroll", "heads", "eagle3", "medusa1", "trees", "checkpoints", "distill",
         "train"]
UPPER = ["synthetic", "specs", "serve_engine", "serve", "serve_reference", "serve_bench", "serve_reliability",
         "provenance", "summary", "batch_summary", "bench", "batch_bench", "report", "cli"]
# the harness's own floors, from the ground up: what a run measured, what it says, how it runs, what people look at
HARNESS = ["provenance", "summary", "batch_summary", "bench", "batch_bench", "report"]
# the draft heads' floors, from the ground up: their vocabulary, the training-time test, the heads, the reference
# EAGLE-3 layout and its export, Medusa-1's heads (each its own output layer), their checkpoints, the data the target
# writes for them, their training; token trees grow from any drafter's `tree_scores` and name none of these
HEADS = ["vocab", "unroll", "heads", "eagle3", "medusa1", "checkpoints", "distill", "train"]


def import_graph(package:Path=PACKAGE) -> dict[str, set[str]]:
    "Module -> the package modules it imports (at any depth of its code: lazy imports in functions count too)."
    mods = {p.stem: p for p in package.glob("*.py") if not p.stem.startswith("_")}
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1: names = [base.split(".")[0]] if base else [a.name for a in node.names]
                elif base == package.name: names = [a.name for a in node.names]
                elif base.startswith(package.name + "."): names = [base.split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith(package.name + ".")]
            edges[m] |= {n for n in names if n in mods and n != m}
    return edges


def reachable(edges, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen: seen.add(nxt); todo.append(nxt)
    return seen


def circles(edges) -> list[list[str]]:
    "Groups of modules that import each other back (strongly connected, more than one module or a self-loop)."
    reach = {m: reachable(edges, m) for m in edges}
    return sorted({tuple(sorted({m} | {x for x in reach[m] if m in reach[x]})) for m in edges if m in reach[m]})


def test_graph_reads_relative_absolute_and_lazy_imports(tmp_path):
    pkg = tmp_path / "specdec"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from specdec.c import y\n")
    (pkg / "c.py").write_text("import specdec.a\nfrom specdec import b\n")
    (pkg / "_modidx.py").write_text("from .a import x\n")
    g = import_graph(pkg)
    assert g == {"a": {"b"}, "b": {"c"}, "c": {"a", "b"}}
    assert circles(g) == [("a", "b", "c")]                       # the check can fail


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_lower_floors_never_import_upper_ones():
    graph = import_graph()
    bad = {m: sorted(graph[m] & set(UPPER)) for m in LOWER if m in graph and graph[m] & set(UPPER)}
    assert bad == {}


def test_the_harness_keeps_its_floors():
    "provenance and summary sit below bench (they read runs, never run them); report summarises through summary."
    graph = import_graph()
    below = {m: sorted(graph[m] & set(HARNESS[i:])) for i, m in enumerate(HARNESS) if graph[m] & set(HARNESS[i:])}
    assert below == {}
    assert "summary" in graph["report"] and "bench" not in graph["report"]


def test_the_heads_keep_their_floors():
    """vocab < unroll < heads < eagle3 < medusa1 < checkpoints < distill < train; the floor-3 modules never import
    floor 4 (the loop, data, training)."""
    graph = import_graph()
    below = {m: sorted(graph[m] & set(HEADS[i:])) for i, m in enumerate(HEADS) if graph[m] & set(HEADS[i:])}
    assert below == {}
    assert graph["trees"] & set(HEADS) == set()                      # trees grow from `tree_scores`, whoever defines it
    floor4 = {"decode", "distill", "train"}
    floor3 = ["vocab", "unroll", "heads", "eagle3", "medusa1", "trees", "checkpoints"]
    assert {m: sorted(graph[m] & floor4) for m in floor3 if graph[m] & floor4} == {}


SERVE_EXTRA = {"fastapi", "uvicorn", "prometheus_client", "starlette", "pydantic"}   # specdec[serve] and what it brings


def top_level_imports(path:Path) -> set[str]:
    "Modules a module imports when it is imported (imports inside functions excluded), dotted (relative: `.x`)."
    names, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)): continue
        if isinstance(node, ast.Import): names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names |= {base} if node.module else {base + a.name for a in node.names}
        todo += list(ast.iter_child_nodes(node))
    return names


def test_the_server_sits_on_top_and_only_it_needs_the_serve_extra():
    """specdec imports without specdec[serve]: no other module imports its packages at import time (the CLI imports
    specdec.serve inside `specdec serve` only); the engine (serve_engine) builds on decode and specs, the app (serve) on
    the engine, neither on the harness or the CLI."""
    graph, server = import_graph(), {"serve", "serve_engine"}
    extra = lambda p: sorted({n.split(".")[0] for n in top_level_imports(p)} & SERVE_EXTRA)
    assert {p.stem: extra(p) for p in PACKAGE.glob("*.py") if p.stem not in server and extra(p)} == {}
    assert "fastapi" in extra(PACKAGE / "serve.py") and "prometheus_client" in extra(PACKAGE / "serve_engine.py")
    assert {"decode", "specs"} <= graph["serve_engine"] and "serve_engine" in graph["serve"]
    assert (graph["serve"] | graph["serve_engine"]) & (set(HARNESS) | {"cli"}) == set()
    assert "serve" in graph["cli"] and not top_level_imports(PACKAGE / "cli.py") & {".serve", "specdec.serve"}


def test_the_serve_benchmark_sits_above_the_server():
    """serve_bench (the client) talks to a server over HTTP and imports neither the server (serve, serve_engine) nor the
    harness above provenance; nothing but the CLI imports it, and the CLI only inside `specdec bench-serve`."""
    graph = import_graph()
    assert graph["serve_bench"] & ({"serve", "serve_engine", "cli"} | set(HARNESS[1:])) == set()
    assert {"provenance", "prompts"} <= graph["serve_bench"]                               # the check can fail
    assert {m for m in graph if "serve_bench" in graph[m]} <= {"cli", "serve_reliability"}
    assert not top_level_imports(PACKAGE / "cli.py") & {".serve_bench", "specdec.serve_bench"}


def test_the_in_process_reference_builds_what_the_server_builds():
    """serve_reference (issue 30's in-process reference, which serve_bench runs before its servers) loads the model
    through the engine (serve_engine) and decodes with decode, imports neither the app, the client nor the CLI, and
    imports torch and the engine only inside its functions (serve_bench imports it at import time)."""
    graph = import_graph()
    assert {"serve_engine", "decode"} <= graph["serve_reference"]                          # the check can fail
    assert graph["serve_reference"] & ({"serve", "serve_bench", "cli"} | set(HARNESS[1:])) == set()
    top = {n.lstrip(".").removeprefix("specdec.").split(".")[0]
           for n in top_level_imports(PACKAGE / "serve_reference.py")}
    assert top & {"torch", "serve_engine", "decode", "prometheus_client"} == set()
    assert "serve_reference" in graph["serve_bench"]


def test_the_reliability_checks_sit_above_the_serve_benchmark():
    """serve_reliability (issue 30's reliability checks) is a client too: it may use serve_bench's helpers, never the
    server or the harness, and serve_bench never imports it."""
    graph = import_graph()
    assert "serve_bench" in graph["serve_reliability"]                                     # the check can fail
    assert graph["serve_reliability"] & ({"serve", "serve_engine"} | set(HARNESS[1:])) == set()
    assert "serve_reliability" not in graph["serve_bench"]


def test_specdec_and_its_command_work_without_the_serve_extra():
    """With fastapi, uvicorn and prometheus-client unimportable, specdec and its CLI import; `specdec serve` says what to
    install."""
    import subprocess, sys
    blocked = ["fastapi", "uvicorn", "prometheus_client", "starlette"]
    script = f"""
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}: raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
import specdec, specdec.cli, specdec.decode, specdec.specs
raise SystemExit(specdec.cli.main(["serve", "tiny-llama"]))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "specdec serve needs the serve extra (fastapi is not installed): pip install 'specdec[serve]'" in run.stderr
