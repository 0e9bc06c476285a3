"""The host side's import structure, read with ``ast`` (no import, no process group):
no import cycle in ``symmtriton/``, the runtime never imports a tool, no host file over 350
lines, every ``SYMMTRITON_*`` variable named in :mod:`symmtriton.env` and listed in README."""

import ast
import pathlib
import re

from symmtriton import env

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "symmtriton"
#: the tools (benchmark, tuner, demo, test harness, test oracle): one folder above the runtime.
TOOLS_PACKAGE = "symmtriton.tools"
#: entry points: the modules outside the tools folder that may import a tool.
ENTRY_POINTS = {"symmtriton.__main__"}


def _is_tool(module: str) -> bool:
    return module == TOOLS_PACKAGE or module.startswith(TOOLS_PACKAGE + ".")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict:
    """module -> the symmtriton modules it imports (anywhere in the file)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                targets = subs if len(subs) == len(node.names) else [base] + subs
            else:
                continue
            for t in targets:
                if t.startswith("symmtriton.kernels"):
                    continue  # device code (kernels/): imports nothing of the host side
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name and (t in files):
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if m == "symmtriton":
                continue  # the package itself: imported by tools only (checked below)
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle():
    assert _cycle(_imports()) is None


def test_runtime_never_imports_tools():
    graph = _imports()
    tools = {m for m in graph if _is_tool(m)}
    assert TOOLS_PACKAGE in tools and len(tools) > 1  # the folder is where this test looks
    runtime = {m for m in graph if not _is_tool(m) and m not in ENTRY_POINTS | {"symmtriton"}}
    bad = {m: sorted(graph[m] & (tools | {"symmtriton"})) for m in runtime}
    assert {m: d for m, d in bad.items() if d} == {}
    # transitively too: what the package's __init__ reaches holds no tool
    seen, todo = set(), ["symmtriton"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m] - {"symmtriton"})
    assert seen & tools == set()


#: tool files still over the limit (to split), listed so that no other grows past it.
OVERSIZE_TOOLS: set = set()


def test_no_host_file_over_350_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 350 and p.name not in OVERSIZE_TOOLS}
    assert long == {}


def test_every_environment_variable_is_in_env_and_readme():
    named = set()
    for p in PKG.rglob("*.py"):
        named |= set(re.findall(r"SYMMTRITON_[A-Z_]*[A-Z]", p.read_text()))
    assert named <= set(env.ALL), named - set(env.ALL)
    readme = (ROOT / "README.md").read_text()
    assert [v for v in env.ALL if f"`{v}`" not in readme] == []
